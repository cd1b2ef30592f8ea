"""Configuration of stage 2, annotation (`recipes/annotate.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, require_apm_checkpoint
from steerlm.data.readers import BadRowPolicy, DataFormat
from steerlm.errors import ConfigError, require_distinct_output


class AnnotateMode(str, Enum):
    fill_missing = "fill_missing"  # keep every human label; score only what is missing
    overwrite = "overwrite"  # replace every assistant turn's labels with the APM's
    # NeMo-Aligner's attribute_annotate.py: only assistant turns that carry a label are scored, every attribute
    # of theirs replaced; turns without one stay as they are
    relabel = "relabel"


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if not Path(self.input).is_file():
            raise ConfigError("input", self.input, "no such file", "pass input=<conversation or HelpSteer JSONL>")
        require_apm_checkpoint(self.apm_checkpoint)
        require_distinct_output(self.output, self.input)
        for key in ("shard_size", "micro_batch_size", "seq_length"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be positive", "use e.g. 1000 / 16 / 1024")
        self.parallel.validate()
