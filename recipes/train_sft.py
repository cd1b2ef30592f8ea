"""Stage 3: attribute-conditioned SFT (or, with sft.condition_on_attributes=false, the plain-SFT baseline).

    python recipes/prepare_data.py data=synthetic                      # the embedded default data, once
    python recipes/train_sft.py                                        # tiny model on data/synthetic/annotated.jsonl
    python recipes/train_sft.py sft.condition_on_attributes=false output_dir=runs/sft_plain
    torchrun --nproc-per-node 2 recipes/train_sft.py parallel=tp2

Writes config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and eval.json (validation loss before and
after, the unigram baseline, example and token counts) to output_dir.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.sft import SFTConfig
from steerlm.runtime import setup_logging
from steerlm.stages import sft

register_schemas()


@hydra.main(config_path="../conf", config_name="train_sft", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    sft.run(to_typed(cfg, SFTConfig))


if __name__ == "__main__":
    main()
