"""Configuration of stage 3, attribute-conditioned SFT (`recipes/train_sft.py`).

`SFTConfig` is a training recipe's config (model, parallel, precision, trainer, optim, checkpoint)
plus the attribute schema, the tokenizer, the training data and `sft`, the options NeMo-Aligner users
know from its SteerLM SFT. The maximum sequence length is `trainer.seq_length` (NeMo's
`max_seq_length`); there is no second knob for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from steerlm.config.schema import Accelerator, LabelledDataTrainConfig, validate_init_from
from steerlm.data.lengths import LengthPolicy
from steerlm.data.template import TemplateConfig, Tokenization
from steerlm.errors import ConfigError


class SFTObjective(str, Enum):
    sft = "sft"  # cross entropy on the conversations' responses (attribute-conditioned SFT or the plain baseline)
    steerlm2 = "steerlm2"  # SteerLM 2.0 on rows of sampled responses (recipes/prepare_steerlm2.py; docs/steerlm2.md)


@dataclass
class SFTOptions:
    """What is trained and how the data is shown to the model."""

    objective: SFTObjective = SFTObjective.sft
    condition_on_attributes: bool = True  # False: the plain-SFT baseline (no attribute line), same data
    answer_only_loss: bool = True  # False: every token is trained (system, user turns, headers, attribute lines)
    train_unlabelled_responses: bool = True  # False: assistant turns without labels are context only
    repeat: int = 1  # the training rows appear this many times per sampler epoch (NeMo-Aligner's docs: 4x)
    packing: bool = False  # pack each step's conversations into rows of trainer.seq_length positions
    system_prompt: Optional[str] = None  # None: keep each conversation's own system prompt
    init_from: Optional[str] = (
        None  # a steerlm run dir / checkpoint, an HF Llama dir or a .nemo: its weights start this run
    )

    def template(self, tokenization: Tokenization = Tokenization.markers) -> TemplateConfig:
        """The SteerLM template's switches and `template.tokenization` (its literals keep NeMo-Aligner's defaults)."""
        return TemplateConfig(
            condition_on_attributes=self.condition_on_attributes,
            answer_only_loss=self.answer_only_loss,
            train_unlabelled_responses=self.train_unlabelled_responses,
            tokenization=tokenization,
        )

    def validate(self, check_files: bool = True) -> None:
        if self.repeat < 1:
            raise ConfigError("sft.repeat", self.repeat, "must be >= 1", "use 1 to read the training file once")
        if check_files:
            validate_init_from("sft.init_from", self.init_from)
        if self.objective == SFTObjective.steerlm2:
            self._validate_steerlm2()

    def _validate_steerlm2(self) -> None:
        """SteerLM 2.0 trains each sampled response on exactly the tokens its log-probabilities were computed on."""
        fixed = {
            "condition_on_attributes": (True, "the responses were sampled and scored for their attributes"),
            "answer_only_loss": (True, "only the sampled response carries a log-probability"),
            "packing": (False, "a prompt's responses are rows of one micro-batch, each with its own positions"),
            "system_prompt": (None, "the rows' system prompts are part of the scored prompts"),
        }
        for name, (required, why) in fixed.items():
            if getattr(self, name) != required:
                raise ConfigError(
                    f"sft.{name}",
                    getattr(self, name),
                    f"is not supported with sft.objective=steerlm2 ({why})",
                    f"set sft.{name}={'null' if required is None else str(required).lower()}",
                )


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
        if (
            self.sft.packing
            and self.model.long_rope
            and self.trainer.seq_length > self.model.rope_original_max_positions
        ):
            raise ConfigError(
                "sft.packing",
                True,
                f"packs conversations into rows of trainer.seq_length={self.trainer.seq_length} positions, past "
                f"LongRoPE's pretraining length (model.rope_original_max_positions="
                f"{self.model.rope_original_max_positions}): every conversation would train with the long factors, "
                "which a conversation of its own length is not served with",
                "set sft.packing=false (each step padded to its longest conversation) or trainer.seq_length <= "
                f"{self.model.rope_original_max_positions}",
            )
        if self.sft.objective == SFTObjective.steerlm2:
            if self.data.length_policy != LengthPolicy.drop:
                raise ConfigError(
                    "data.length_policy",
                    self.data.length_policy.value,
                    "would cut responses whose log-probabilities were computed whole",
                    "use data.length_policy=drop (a prompt with a response longer than trainer.seq_length is left out)",
                )
            if self.parallel.context_parallel_size != 1:
                raise ConfigError(
                    "parallel.context_parallel_size",
                    self.parallel.context_parallel_size,
                    "splits a response across ranks, but SteerLM 2.0 weighs each response's whole log-probability",
                    "use parallel.context_parallel_size=1",
                )
        return dp
