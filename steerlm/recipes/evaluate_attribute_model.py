"""Stage 1's evaluation: score a labelled file with a trained Attribute Prediction Model.

    python recipes/evaluate_attribute_model.py apm_checkpoint=runs/apm input=data/synthetic/annotated.jsonl \
        format=helpsteer2 validation_fraction=0.1          # the rows the APM held out: its eval.json again
    torchrun --nproc-per-node 2 recipes/evaluate_attribute_model.py parallel=tp2 input=… format=…

Writes config.yaml and eval.json (per-attribute MAE, RMSE, Pearson, Spearman, exact match after rounding,
and the merged reward's figures when the APM has apm.merge_weights) to output_dir, and logs the table.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="evaluate_attribute_model", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, EvaluateAttributeModelConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import attribute_model

    attribute_model.evaluate(typed)


if __name__ == "__main__":
    main()
