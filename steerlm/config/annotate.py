"""Configuration of stage 2, annotation (`recipes/annotate.py`), and of its Bayes judge (`annotate.judge`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, PrecisionConfig, require_apm_checkpoint
from steerlm.data.readers import BadRowPolicy, DataFormat
from steerlm.errors import ConfigError, require, require_distinct_output


class AnnotateMode(str, Enum):
    fill_missing = "fill_missing"  # keep every human label; score only what is missing
    overwrite = "overwrite"  # replace every assistant turn's labels with the APM's
    # NeMo-Aligner's attribute_annotate.py: only assistant turns that carry a label are scored, every attribute
    # of theirs replaced; turns without one stay as they are
    relabel = "relabel"


@dataclass
class JudgeConfig:
    """Attributes judged by Bayes' rule with an attribute-conditioned model instead of read off the APM
    (steerlm/inference/judge.py, docs/annotate.md "The Bayes judge"), and attributes then re-predicted from the
    others by a least-squares fit on rated data (steerlm/data/label_fit.py)."""

    checkpoint: Optional[str] = None  # a recipes/train_sft.py run or checkpoint trained with attributes
    attributes: list[str] = field(default_factory=list)  # e.g. [correctness]
    micro_batch_size: int = 64  # responses per forward pass (each judged turn is levels x attributes of them)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # e.g. [quality]: an overall attribute that the judged ones change; fitted on `refit_data`'s ratings
    refit: list[str] = field(default_factory=list)
    refit_data: Optional[str] = None  # rated data (e.g. the APM's training file)
    refit_format: DataFormat = DataFormat.helpsteer2

    @property
    def enabled(self) -> bool:
        return self.checkpoint is not None

    def validate(self, key: str = "judge", check_files: bool = True) -> None:
        """`key`: where the section sits (`judge` in annotate, `bootstrap.judge` in the bootstrap);
        `check_files`: whether `refit_data` must exist here (not when a job is written for another machine)."""
        if not self.enabled:
            require(
                not self.attributes and not self.refit,
                f"{key}.checkpoint",
                None,
                f"{key}.attributes / {key}.refit need a judge",
                f"pass {key}.checkpoint=<recipes/train_sft.py output_dir>, or leave {key}.attributes and "
                f"{key}.refit empty",
            )
            return
        require(
            bool(self.attributes),
            f"{key}.attributes",
            list(self.attributes),
            "is empty: the judge would judge nothing",
            f"name the attributes to judge, e.g. {key}.attributes=[correctness]",
        )
        require(
            self.micro_batch_size >= 1, f"{key}.micro_batch_size", self.micro_batch_size, "must be positive", "use 64"
        )
        both = sorted(set(self.attributes) & set(self.refit))
        require(
            not both,
            f"{key}.refit",
            list(self.refit),
            f"{', '.join(both)} cannot be both judged and re-predicted",
            f"name each attribute in one of {key}.attributes and {key}.refit",
        )
        if self.refit:
            require(
                self.refit_data is not None and (not check_files or Path(self.refit_data).is_file()),
                f"{key}.refit_data",
                self.refit_data,
                f"no such file: {key}.refit learns its fit from rated data",
                f"pass {key}.refit_data=<rated JSONL, e.g. the APM's training file> (and {key}.refit_format)",
            )
        self.precision.validate()


@dataclass
class AnnotateConfig:
    apm_checkpoint: str = MISSING  # an APM run directory (its checkpoints/latest) or one checkpoint
    input: str = MISSING
    format: DataFormat = DataFormat.conversation
    output: str = MISSING  # conversation JSONL; work files go to <output>.parts/
    mode: AnnotateMode = AnnotateMode.fill_missing
    shard_size: int = 1000  # input rows per resumable part file
    micro_batch_size: int = 16  # rows per forward pass (length-bucketed)
    seq_length: int = 1024  # longer inputs keep their end (the rated response) and are counted
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    rejects: Optional[str] = None  # None: <output>.rejects.jsonl
    torch_threads: Optional[int] = None
    verify_checkpoint: bool = True  # SHA-256 checksums checked before loading; false: skip (huge checkpoints)
    seed: int = 1234
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if not Path(self.input).is_file():
            raise ConfigError("input", self.input, "no such file", "pass input=<conversation or HelpSteer JSONL>")
        require_apm_checkpoint(self.apm_checkpoint)
        require_distinct_output(self.output, self.input)
        for key in ("shard_size", "micro_batch_size", "seq_length"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be positive", "use e.g. 1000 / 16 / 1024")
        self.judge.validate()
        self.parallel.validate()
