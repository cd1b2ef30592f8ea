"""Demo on the embedded default: a tiny Llama trained from scratch on the bundled text.

    python recipes/demo.py [key=value ...]
    torchrun --nproc-per-node 2 recipes/demo.py parallel=tp2

Writes config.yaml, metrics.jsonl and summary.json to output_dir (default runs/demo).
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import pretrain

    pretrain.run(typed)


if __name__ == "__main__":
    main()
