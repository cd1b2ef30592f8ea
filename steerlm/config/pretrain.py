"""Configuration of stage 0, pretraining the base LM on plain text (`recipes/pretrain.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import Accelerator, TokenizerConfig, TrainConfig, validate_init_from
from steerlm.errors import require


@dataclass
class TextDataConfig:
    """A JSONL file of documents (`{"<key>": "text"}`); validation documents held out by a hash of file:line."""

    train_file: str = MISSING
    key: str = "text"
    validation_fraction: float = 0.02

    def validate(self, check_files: bool = True) -> None:
        if check_files:
            require(
                Path(self.train_file).is_file(),
                "data.train_file",
                self.train_file,
                "no such file",
                "generate the default with `python recipes/prepare_data.py data=synthetic` (corpus.jsonl) or "
                "pass a JSONL file of documents",
            )
        require(
            0.0 <= self.validation_fraction < 1.0,
            "data.validation_fraction",
            self.validation_fraction,
            "must be in [0, 1)",
            "use e.g. 0.02",
        )


@dataclass
class PretrainOptions:
    init_from: Optional[str] = None  # continue pretraining a steerlm or HF Llama checkpoint; null: from scratch


@dataclass
class PretrainConfig(TrainConfig):
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    pretrain: PretrainOptions = field(default_factory=PretrainOptions)
    output_dir: str = "runs/base"

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        dp = super().validate(world_size, accelerator, this_machine)
        self.data.validate(check_files=this_machine)
        if this_machine:
            self.tokenizer.validate()
            validate_init_from("pretrain.init_from", self.pretrain.init_from)
        return dp
