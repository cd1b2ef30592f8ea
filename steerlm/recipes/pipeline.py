"""SteerLM end to end on the synthetic world, world to report — the main job (`make demo`).

    python recipes/pipeline.py                                  # runs/pipeline/report.md
    python recipes/pipeline.py synthetic.seed=1 output_dir=runs/pipeline_seed1
    python recipes/pipeline.py pipeline.parallel=tp2            # every stage under torchrun
    python recipes/pipeline.py 'stages.sft=["trainer.max_steps=2000"]'

Runs prepare_data → pretrain → train_attribute_model → annotate → train_sft (with and without attributes) →
bootstrap → evaluate_steering, each as its own recipe with its log in output_dir/logs/, then writes
report.md (+ figures/, report.json, timings.json). Rerunning resumes: complete stages are kept.
"""

import sys

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.pipeline import PipelineConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="pipeline", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    command = "python recipes/pipeline.py " + " ".join(sys.argv[1:])
    typed = to_typed(cfg, PipelineConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import pipeline, report

    pipeline.run(typed, lambda typed: report.report(typed, command.strip()))


if __name__ == "__main__":
    main()
