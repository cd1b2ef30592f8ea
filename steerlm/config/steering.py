"""Configuration of the steerability evaluation (`recipes/evaluate_steering.py`).

A SteerLM model is steerable when asking for more of an attribute gives responses with more of it and
leaves the others alone. The evaluation sweeps one attribute at a time over `values` while the others
stay at `base`, generates a response per prompt and value, and measures what came out: response length
always, and every attribute's true level when the prompts come from the synthetic world (its oracle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, PrecisionConfig
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.readers import DataFormat
from steerlm.errors import ConfigError


@dataclass
class SteeringEvalConfig:
    checkpoint: str = MISSING  # a recipes/train_sft.py output_dir or checkpoint
    tokenizer_path: Optional[str] = None  # null: the tokenizer directory the checkpoint was trained with
    prompts: str = "data/synthetic/eval_prompts.jsonl"  # conversations ending with a user turn
    prompts_format: DataFormat = DataFormat.conversation
    world: Optional[str] = "data/synthetic/world.json"  # the synthetic world's oracle scores responses; null: off
    num_prompts: int = 100  # the first N conversations of `prompts`
    sweep: list[str] = field(default_factory=list)  # attributes to sweep; empty: every attribute of the schema
    values: Optional[list[float]] = None  # requested levels; null: every integer level of the schema's range
    # every attribute's level while another is swept, over the checkpoint schema's defaults (SteerLM's best response)
    base: dict[str, float] = field(default_factory=dict)
    max_new_tokens: int = 96
    batch_size: int = 32
    samples: int = 2  # responses kept in the report per swept value
    only_base: bool = False  # measure the base request only (e.g. a plain-SFT model, which ignores attributes)
    verify_checkpoint: bool = True  # SHA-256 checksums checked before loading; false: skip (huge checkpoints)
    seed: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    output: str = "runs/steering/eval.json"

    def validate(self) -> None:
        if not Path(self.prompts).is_file():
            raise ConfigError(
                "prompts",
                self.prompts,
                "no such file",
                "generate the default with `python recipes/prepare_data.py data=synthetic` or pass a file",
            )
        if self.world is not None and not Path(self.world).is_file():
            raise ConfigError(
                "world",
                self.world,
                "no such file",
                "pass the synthetic world's world.json, or world=null to measure lengths only",
            )
        for key in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1", f"pass {key}=<a positive number>")

    def resolve(self, schema: AttributeSchema) -> tuple[list[str], list[float], Labels]:
        """The swept attributes, the requested levels and the base levels, checked against `schema`."""
        sweep = list(self.sweep) or list(schema.attributes)
        for name in sweep:
            if name not in schema.attributes:
                raise ConfigError(
                    "sweep",
                    sweep,
                    f"{name!r} is not an attribute of the checkpoint's schema {schema.name!r}",
                    f"choose from {', '.join(schema.attributes)}",
                )
        levels = (
            self.values
            if self.values is not None
            else [float(v) for v in range(int(schema.min_value), int(schema.max_value) + 1)]
        )
        if len(levels) < 2 or any(not schema.min_value <= v <= schema.max_value for v in levels):
            raise ConfigError(
                "values",
                levels,
                f"needs two or more levels within [{schema.min_value:g}, {schema.max_value:g}]",
                "e.g. values=[0,4], or null for every level",
            )
        unknown = [name for name in self.base if name not in schema.attributes]
        if unknown:
            raise ConfigError(
                f"base.{unknown[0]}",
                dict(self.base),
                f"is not an attribute of the checkpoint's schema {schema.name!r}",
                f"give levels for {', '.join(schema.attributes)}",
            )
        given = {**schema.default_labels, **self.base}
        missing = [name for name in schema.attributes if name not in given]
        if missing:
            raise ConfigError(
                f"base.{missing[0]}",
                dict(self.base),
                f"is missing: schema {schema.name!r} has no default for it (attributes.request_defaults)",
                f"give a level for each of {', '.join(missing)}",
            )
        schema.check(given, source="base", field="base")
        base: Labels = {name: float(value) for name in schema.attributes if (value := given[name]) is not None}
        return sweep, [float(v) for v in levels], base
