"""Configuration of stage 4, the bootstrap (`recipes/bootstrap.py`; the SteerLM paper's §3.4).

A bootstrap run is an SFT run (every SFT key applies to its fine-tuning: model, parallel, trainer, optim,
`sft.*`) whose `sft.init_from` is the stage-3 model and whose `data.train_file` is stage 3's training data:
the source of the prompts and of the attribute combinations asked for, and optionally mixed into each
fine-tuning. `bootstrap.*` says how to sample and label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.annotate import JudgeConfig
from steerlm.config.schema import Accelerator
from steerlm.config.sft import SFTConfig
from steerlm.errors import require


@dataclass
class BootstrapOptions:
    apm_checkpoint: str = MISSING  # the APM whose predictions label the samples (not the requested values)
    quality_attribute: Optional[str] = None  # null: `quality` if the schema has it, else `helpfulness` (HelpSteer2)
    num_prompts: int = 1000  # prompts drawn from data.train_file per iteration
    samples_per_prompt: int = 2  # responses sampled per (prompt, attribute combination)
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64  # prompts generated together
    iterations: int = 1  # each fine-tunes the previous iteration's model on its own labelled samples
    mix_original: bool = True  # also train on data.train_file (stage 3's data) in each fine-tuning
    chunk_rows: int = 256  # samples per resumable part file
    # attributes labelled by the Bayes judge instead of the APM, as in annotation (docs/annotate.md)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self, check_files: bool = True) -> None:
        if check_files:
            require(
                Path(self.apm_checkpoint).is_dir(),
                "bootstrap.apm_checkpoint",
                self.apm_checkpoint,
                "is not a directory",
                "pass the output_dir of recipes/train_attribute_model.py",
            )
        for key in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size", "iterations", "chunk_rows"):
            require(getattr(self, key) >= 1, f"bootstrap.{key}", getattr(self, key), "must be >= 1", "use a value >= 1")
        require(self.temperature >= 0, "bootstrap.temperature", self.temperature, "must be >= 0", "use e.g. 0.7")
        require(self.top_k >= 0, "bootstrap.top_k", self.top_k, "must be >= 0", "use 0 to disable top-k")
        require(0 < self.top_p <= 1, "bootstrap.top_p", self.top_p, "must be in (0, 1]", "use 1.0 to disable top-p")
        self.judge.validate("bootstrap.judge", check_files)


@dataclass
class BootstrapConfig(SFTConfig):
    bootstrap: BootstrapOptions = field(default_factory=BootstrapOptions)
    output_dir: str = "runs/bootstrap"

    def quality_attribute(self) -> str:
        """The attribute whose maximum selects the combinations to ask for."""
        names = self.attributes.attributes
        return self.bootstrap.quality_attribute or ("quality" if "quality" in names else "helpfulness")

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        dp = super().validate(world_size, accelerator, this_machine)
        self.bootstrap.validate(check_files=this_machine)
        require(
            self.sft.init_from is not None,
            "sft.init_from",
            self.sft.init_from,
            "the bootstrap samples from the stage-3 model",
            "pass sft.init_from=<the output_dir of recipes/train_sft.py>",
        )
        require(
            self.sft.condition_on_attributes,
            "sft.condition_on_attributes",
            False,
            "the bootstrap asks for attribute combinations, which a model without attribute lines cannot take",
            "bootstrap an attribute-conditioned SFT model",
        )
        quality = self.quality_attribute()
        require(
            quality in self.attributes.attributes,
            "bootstrap.quality_attribute",
            quality,
            f"is not an attribute of the schema ({', '.join(self.attributes.attributes)})",
            "name the attribute whose maximum marks the best responses",
        )
        return dp
