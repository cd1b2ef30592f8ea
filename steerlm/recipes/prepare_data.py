"""Convert a dataset to NeMo-Aligner conversation JSONL and print a summary.

    python recipes/prepare_data.py format=helpsteer2 input=train.jsonl.gz output=data/train.jsonl
    python recipes/prepare_data.py format=oasst attributes=steerlm_oasst input=2023-04-12_oasst_ready.trees.jsonl.gz \
        output=data/oasst.jsonl on_bad_row=reject

Writes <output>, <output>.summary.json and, with on_bad_row=reject, <output>.rejects.jsonl.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import PrepareDataConfig, register_schemas, to_typed

register_schemas()


@hydra.main(config_path="../conf", config_name="prepare_data", version_base=None)
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg, PrepareDataConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import prepare_data

    summary = prepare_data.run(typed)
    print(prepare_data.format_summary(summary))


if __name__ == "__main__":
    main()
