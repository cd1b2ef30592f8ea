"""Steerability of an attribute-conditioned SFT model: sweep each attribute, measure what comes out.

    python recipes/evaluate_steering.py checkpoint=runs/sft
    python recipes/evaluate_steering.py checkpoint=runs/sft sweep=[verbosity,humor] values=[0,4] num_prompts=50
    torchrun --nproc-per-node 2 recipes/evaluate_steering.py checkpoint=runs/sft parallel=tp2

On the synthetic world's prompts the oracle measures every attribute of every response; on other
prompts (world=null) only response lengths are reported.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.steering import SteeringEvalConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="evaluate_steering", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, SteeringEvalConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.evaluation.steerability import format_report
    from steerlm.stages import evaluate_steering

    report = evaluate_steering.run(typed)
    if report is not None:
        print(f"requested level → measured level (mean words), {report['prompts']} prompts, step {report['step']}")
        print(format_report(report["attributes"]))


if __name__ == "__main__":
    main()
