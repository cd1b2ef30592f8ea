"""Configuration of the whole SteerLM pipeline on the synthetic world (`recipes/pipeline.py`, `make demo`).

world → base LM → APM → annotate → SFT and the plain-SFT baseline → bootstrap → steering evaluations →
report. Each stage is its own recipe run with its own config (conf/<recipe>.yaml); the pipeline passes the
paths that chain them, `pipeline.parallel`, and the extra overrides of `stages.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from steerlm.data.synthetic.sizes import SyntheticConfig
from steerlm.errors import require

# The stages in the order they run; `stages.<name>` gives each extra Hydra overrides.
STAGE_NAMES = (
    "world",
    "pretrain",
    "apm",
    "judge",
    "annotate",
    "sft",
    "sft_plain",
    "bootstrap",
    "steer_sft",
    "steer_bootstrap",
    "steer_plain",
)

SFT_INITS = ("base", "judge")  # pipeline.sft_init


@dataclass
class PipelineOptions:
    parallel: str = "single"  # a conf/parallel option: every stage runs at it (under torchrun when > 1 process)
    # false: stop after the wave of the first failed stage; true: run every stage that does not need a failed one
    keep_going: bool = False
    # independent stages (SFT and plain SFT; the three steering evaluations) run at the same time, sharing `threads`
    concurrent: bool = True
    threads: Optional[int] = None  # CPU threads the stages share; None: $OMP_NUM_THREADS, else 2
    # attributes stage 2 labels with the Bayes judge, an attribute-conditioned model trained on the rated data
    # (stage `judge`, beside the APM), instead of the APM: e.g. [correctness] (docs/pipeline.md, "The Bayes judge")
    judge: list[str] = field(default_factory=list)
    judge_refit: list[str] = field(default_factory=list)  # then re-predicted from the others, e.g. [quality]
    # what stage 3 starts from: "base" (the base LM, as from a pretrained Llama) or "judge" (the Bayes judge, itself
    # an attribute-conditioned SFT model of the rated data; needs pipeline.judge). Plain SFT starts from the base LM.
    sft_init: str = "base"


@dataclass
class Targets:
    """What the run should reach; the report marks each figure met or missed (it never changes a figure)."""

    apm_pearson_surface: float = 0.95  # each of toxicity, humor, creativity, complexity, verbosity
    apm_pearson_knowledge: float = 0.7  # correctness and helpfulness
    steer_spearman_surface: float = 0.97
    steer_exact_match_surface: float = 0.8  # at every requested level
    steer_spearman_knowledge: float = 0.7  # helpfulness and correctness
    bootstrap_gain: float = 0.05  # oracle quality or exact match at the top setting, over stage 3


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    stages: dict[str, list[str]] = field(default_factory=dict)  # stage name → extra overrides of its recipe
    targets: Targets = field(default_factory=Targets)

    def validate(self) -> None:
        self.synthetic.validate()
        threads = self.pipeline.threads
        require(
            threads is None or threads >= 1,
            "pipeline.threads",
            threads,
            "must be >= 1",
            "use a positive count, or null for $OMP_NUM_THREADS (else 2)",
        )
        require(
            bool(self.pipeline.judge) or not self.pipeline.judge_refit,
            "pipeline.judge_refit",
            list(self.pipeline.judge_refit),
            "re-predicts attributes after the Bayes judge, and pipeline.judge is empty",
            "name the judged attributes in pipeline.judge (e.g. [correctness]), or leave pipeline.judge_refit empty",
        )
        require(
            self.pipeline.sft_init in SFT_INITS,
            "pipeline.sft_init",
            self.pipeline.sft_init,
            "is not a model stage 3 can start from",
            f"use one of {', '.join(SFT_INITS)}",
        )
        require(
            self.pipeline.sft_init != "judge" or bool(self.pipeline.judge),
            "pipeline.sft_init",
            self.pipeline.sft_init,
            "starts stage 3 from the Bayes judge, and pipeline.judge is empty (no judge is trained)",
            "name the judged attributes in pipeline.judge (e.g. [correctness,helpfulness]), or use base",
        )
        unknown = [name for name in self.stages if name not in STAGE_NAMES]
        require(
            not unknown,
            f"stages.{unknown[0] if unknown else ''}",
            dict(self.stages),
            "is not a stage of the pipeline",
            f"use one of {', '.join(STAGE_NAMES)}",
        )
        for name, overrides in self.stages.items():
            for override in overrides:
                require(
                    "=" in override and not override.startswith(("output", "+")),
                    f"stages.{name}",
                    list(overrides),
                    f"{override!r} is not a key=value override the pipeline may pass",
                    "give key=value overrides of the stage's recipe; the pipeline sets the stage's inputs and "
                    "outputs itself",
                )
