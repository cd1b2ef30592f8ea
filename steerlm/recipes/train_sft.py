"""Stage 3: attribute-conditioned SFT (or, with sft.condition_on_attributes=false, the plain-SFT baseline).

    python recipes/prepare_data.py data=synthetic                      # the embedded default data, once
    python recipes/train_sft.py                                        # tiny model on data/synthetic/annotated.jsonl
    python recipes/train_sft.py sft.condition_on_attributes=false output_dir=runs/sft_plain
    torchrun --nproc-per-node 2 recipes/train_sft.py parallel=tp2
    python recipes/train_sft.py sft.objective=steerlm2 sft.init_from=runs/sft \
        data.train_file=data/steerlm2.jsonl output_dir=runs/steerlm2     # SteerLM 2.0 (docs/steerlm2.md)

Writes config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and eval.json (validation loss before and
after, the unigram baseline, example and token counts) to output_dir.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.sft import SFTConfig, SFTObjective
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="train_sft", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, SFTConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import sft, steerlm2

    stage = steerlm2 if typed.sft.objective == SFTObjective.steerlm2 else sft
    stage.run(typed)


if __name__ == "__main__":
    main()
