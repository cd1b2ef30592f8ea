"""Stage 4: bootstrap — sample the stage-3 model at the best attribute settings, label with the APM, fine-tune.

    python recipes/bootstrap.py sft.init_from=runs/sft bootstrap.apm_checkpoint=runs/apm
    python recipes/bootstrap.py ... bootstrap.iterations=2 bootstrap.temperature=1.0 bootstrap.top_k=20
    torchrun --nproc-per-node 2 recipes/bootstrap.py parallel=tp2 ...

Writes iter_<i>/{samples.jsonl, labelled.jsonl, sft/} and eval.json to output_dir (default runs/bootstrap);
the last iteration's sft/ is the bootstrapped model. Rerunning continues where a killed run stopped.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="bootstrap", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, BootstrapConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import bootstrap

    bootstrap.run(typed)


if __name__ == "__main__":
    main()
