"""Configuration of stage 3, attribute-conditioned SFT (`recipes/train_sft.py`).

`SFTConfig` is a training recipe's config (model, parallel, precision, trainer, optim, checkpoint)
plus the attribute schema, the tokenizer, the training data and `sft`, the options NeMo-Aligner users
know from its SteerLM SFT. The maximum sequence length is `trainer.seq_length` (NeMo's
`max_seq_length`); there is no second knob for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from steerlm.config.schema import Accelerator, LabelledDataTrainConfig, validate_init_from
from steerlm.data.template import TemplateConfig
from steerlm.errors import ConfigError


@dataclass
class SFTOptions:
    """What is trained and how the data is shown to the model."""

    condition_on_attributes: bool = True  # False: the plain-SFT baseline (no attribute line), same data
    answer_only_loss: bool = True  # False: every token is trained (system, user turns, headers, attribute lines)
    train_unlabelled_responses: bool = True  # False: assistant turns without labels are context only
    repeat: int = 1  # the training rows appear this many times per sampler epoch (NeMo-Aligner's docs: 4x)
    packing: bool = False  # pack each step's conversations into rows of trainer.seq_length positions
    system_prompt: Optional[str] = None  # None: keep each conversation's own system prompt
    init_from: Optional[str] = None  # a steerlm run dir / checkpoint or an HF Llama dir: its weights start this run

    def template(self) -> TemplateConfig:
        """The SteerLM template's switches (its literals keep NeMo-Aligner's defaults)."""
        return TemplateConfig(
            condition_on_attributes=self.condition_on_attributes,
            answer_only_loss=self.answer_only_loss,
            train_unlabelled_responses=self.train_unlabelled_responses,
        )

    def validate(self, check_files: bool = True) -> None:
        if self.repeat < 1:
            raise ConfigError("sft.repeat", self.repeat, "must be >= 1", "use 1 to read the training file once")
        if check_files:
            validate_init_from("sft.init_from", self.init_from)


@dataclass
class SFTConfig(LabelledDataTrainConfig):
    """`recipes/train_sft.py`: attribute-conditioned SFT (or, without attributes, the plain-SFT baseline)."""

    sft: SFTOptions = field(default_factory=SFTOptions)
    output_dir: str = "runs/sft"

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        dp = super().validate(world_size, accelerator, this_machine)
        self.sft.validate(check_files=this_machine)
        return dp
