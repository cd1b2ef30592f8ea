"""Configuration of low-rank adapters (`lora.*` of every training recipe; steerlm.models.lora builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from steerlm.errors import ConfigError, require

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # megatron's names of a layer's linears
# NeMo's `model.peft.lora_tuning.target_modules` names for the same layers (what a NeMo config carries over)
NEMO_LORA_TARGETS = {
    "attention_qkv": ["linear_qkv"],
    "attention_dense": ["linear_proj"],
    "mlp_fc1": ["linear_fc1"],
    "mlp_fc2": ["linear_fc2"],
    "attention": ["linear_qkv", "linear_proj"],
    "mlp": ["linear_fc1", "linear_fc2"],
    "all": list(LORA_TARGETS),
}


class LoraCheckpoint(str, Enum):
    """What a LoRA run's checkpoints hold besides the adapters (and an APM's head, which trains in full)."""

    auto = "auto"  # `adapters` when the run starts from init_from, `full` when its base is its own initialisation
    adapters = "adapters"  # the trained parameters alone; every read loads the base (init_from) first
    full = "full"  # the frozen weights too: self-contained, the size of the model


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA): the model's weights stay frozen and each targeted linear layer learns
    W + (alpha / rank) * B @ A, B starting at zero (NeMo's `model.peft.lora_tuning`, PEFT's LoraConfig).

    The adapters follow the layer's tensor parallelism (docs/sft.md#lora). Checkpoints hold the adapters, and
    the frozen weights too unless `checkpoint` keeps them in the base the run started from (NeMo's and PEFT's
    adapter checkpoints); everything that reads a checkpoint's weights (inference, export, init_from) gets the
    merged W + (alpha / rank) * B @ A. rank 0 trains every weight, as without this section.
    """

    rank: int = 0  # NeMo's adapter_dim; 0: no adapters, full fine-tuning
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training (NeMo's adapter_dropout, PEFT's lora_dropout)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    checkpoint: LoraCheckpoint = LoraCheckpoint.auto

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        require(self.rank >= 0, "lora.rank", self.rank, "must be >= 0", "use 0 for full fine-tuning, e.g. 16 for LoRA")
        require(
            self.enabled or self.checkpoint != LoraCheckpoint.adapters,
            "lora.checkpoint",
            self.checkpoint.value,
            "saves adapters alone, but lora.rank=0 trains no adapters",
            "set lora.rank (e.g. 16), or leave lora.checkpoint=auto",
        )
        if not self.enabled:
            return
        require(self.alpha > 0, "lora.alpha", self.alpha, "must be positive", "e.g. lora.alpha=32")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)", "e.g. lora.dropout=0.05")
        require(
            len(self.targets) > 0,
            "lora.targets",
            self.targets,
            "names no layer",
            f"name some of {list(LORA_TARGETS)}",
        )
        for target in self.targets:
            if target not in LORA_TARGETS:
                megatron = NEMO_LORA_TARGETS.get(target)
                fix = f"use {megatron} for NeMo's {target!r}" if megatron else f"use some of {list(LORA_TARGETS)}"
                raise ConfigError("lora.targets", self.targets, f"{target!r} is not a layer steerlm adapts", fix)
        require(
            len(set(self.targets)) == len(self.targets),
            "lora.targets",
            self.targets,
            "names a layer twice",
            "name each layer once",
        )

    def describe(self) -> dict:
        """What a checkpoint records of its adapters (and a resume compares)."""
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": list(self.targets)}
