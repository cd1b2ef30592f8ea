"""SteerLM 2.0's training rows: n responses per prompt from the stage-3 model and their log-probabilities.

    python recipes/train_sft.py sft.condition_on_attributes=false output_dir=runs/sft_plain   # P(y|x), once
    python recipes/prepare_steerlm2.py steerlm_checkpoint=runs/sft plain_sft_checkpoint=runs/sft_plain \
        apm_checkpoint=runs/apm input=data/synthetic/annotated.jsonl format=helpsteer2 \
        output=data/synthetic/steerlm2.jsonl
    torchrun --nproc-per-node 2 recipes/prepare_steerlm2.py parallel=tp2 …     # the models split 2-way
    python recipes/train_sft.py sft.objective=steerlm2 sft.init_from=runs/sft \
        data.train_file=data/synthetic/steerlm2.jsonl output_dir=runs/steerlm2

Rerunning the same command after an interruption continues from the finished shards (docs/steerlm2.md).
"""

import json
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.steerlm2 import PrepareSteerLM2Config
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="prepare_steerlm2", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, PrepareSteerLM2Config)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import prepare_steerlm2

    summary = prepare_steerlm2.run(typed)
    if summary is not None:
        print(json.dumps(asdict(summary), indent=2))


if __name__ == "__main__":
    main()
