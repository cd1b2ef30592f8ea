"""Stage 2: annotate a dataset with a trained Attribute Prediction Model.

    python recipes/annotate.py apm_checkpoint=runs/apm input=data/synthetic/unlabelled.jsonl \
        output=data/synthetic/annotated_by_apm.jsonl
    torchrun --nproc-per-node 2 recipes/annotate.py apm_checkpoint=runs/apm input=… output=…   # 2-way DP

Rerunning the same command after an interruption continues from the finished shards.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.annotate import AnnotateConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="annotate", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, AnnotateConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import annotate

    summary = annotate.run(typed)
    if summary is not None:
        print(annotate.format_annotate_summary(summary))


if __name__ == "__main__":
    main()
