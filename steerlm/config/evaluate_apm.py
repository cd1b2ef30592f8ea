"""Configuration of the APM evaluation (`recipes/evaluate_attribute_model.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, require_apm_checkpoint
from steerlm.data.lengths import LengthPolicy
from steerlm.data.readers import DataFormat
from steerlm.errors import ConfigError


@dataclass
class EvaluateAttributeModelConfig:
    apm_checkpoint: str = MISSING  # an APM run directory (its checkpoints/latest) or one checkpoint
    input: str = MISSING  # labelled conversations in any reader format
    format: DataFormat = DataFormat.conversation
    output_dir: str = "runs/apm_eval"  # eval.json and config.yaml go here
    # Only the rows recipes/train_attribute_model.py holds out at this data.validation_fraction (its eval.json's
    # rows, when `input` is its data.train_file); null: every row of `input`.
    validation_fraction: Optional[float] = None
    seq_length: Optional[int] = None  # null: the APM's trainer.seq_length
    length_policy: LengthPolicy = LengthPolicy.drop  # as the APM's own evaluation; truncate keeps the end
    micro_batch_size: int = 16  # rows per forward pass (length-bucketed)
    torch_threads: Optional[int] = None
    verify_checkpoint: bool = True  # SHA-256 checksums checked before loading; false: skip (huge checkpoints)
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if not Path(self.input).is_file():
            raise ConfigError(
                "input",
                self.input,
                "no such file",
                "pass input=<labelled data file> (and format=… when it is not conversation JSONL)",
            )
        require_apm_checkpoint(self.apm_checkpoint)
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                "validation_fraction",
                self.validation_fraction,
                "must be in (0, 1)",
                "use the APM's data.validation_fraction (e.g. 0.1), or null for every row",
            )
        for key in ("seq_length", "micro_batch_size", "torch_threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, value, "must be positive", "use e.g. 16 (seq_length and torch_threads: or null)")
        self.parallel.validate()
