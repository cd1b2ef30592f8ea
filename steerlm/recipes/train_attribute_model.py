"""Stage 1: train the regression Attribute Prediction Model.

    python recipes/prepare_data.py data=synthetic          # the embedded default data, once
    python recipes/train_attribute_model.py                # tiny APM on data/synthetic/annotated.jsonl
    torchrun --nproc-per-node 2 recipes/train_attribute_model.py parallel=tp2

Writes config.yaml, metrics.jsonl, checkpoints/ and eval.json (per-attribute MAE, RMSE, Pearson,
Spearman, exact match on the held-out rows) to output_dir.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import AttributeModelConfig, register_schemas, to_typed
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="train_attribute_model", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, AttributeModelConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import attribute_model

    attribute_model.run(typed)


if __name__ == "__main__":
    main()
