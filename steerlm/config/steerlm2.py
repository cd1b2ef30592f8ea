"""Configuration of SteerLM 2.0's data preparation (`recipes/prepare_steerlm2.py`, docs/steerlm2.md).

Three trained models make the rows: the stage-3 SteerLM model Q'(y|a,x) samples `num_responses` answers per
prompt and scores them, a plain-SFT model (trained with `sft.condition_on_attributes=false`) gives
P(y|x), and a regression APM gives P(a|x,y) through a Beta distribution over each attribute's levels.
Training on the rows is `recipes/train_sft.py sft.objective=steerlm2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, PrecisionConfig
from steerlm.config.validation import validate_generation_layout
from steerlm.data.readers import BadRowPolicy, DataFormat
from steerlm.errors import require, require_distinct_output


@dataclass
class PrepareSteerLM2Config:
    input: str = (
        MISSING  # conversations whose last turn is a labelled assistant turn: x = the turns before it, a = its labels
    )
    format: DataFormat = DataFormat.conversation
    output: str = MISSING  # SteerLM 2.0 rows (NeMo-Aligner's JSONL); work files in <output>.parts/
    steerlm_checkpoint: str = MISSING  # Q'(y|a,x): a recipes/train_sft.py run (attribute-conditioned)
    plain_sft_checkpoint: str = MISSING  # P(y|x): a recipes/train_sft.py run with sft.condition_on_attributes=false
    apm_checkpoint: str = MISSING  # P(a|x,y): a regression APM of the same attribute schema
    num_responses: int = 4  # n, sampled per prompt
    max_prompts: Optional[int] = None  # the first this many prompts of the input; None: all
    temperature: float = 1.0  # 1 with top_k=0, top_p=1 samples Q' itself, as the importance weights assume
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    attribute_concentration: float = 20.0  # alpha + beta of each attribute's Beta distribution (docs/steerlm2.md)
    shard_size: int = 200  # prompts per resumable part file
    micro_batch_size: int = 16  # sequences per forward pass (generation, log-probabilities, APM)
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    rejects: Optional[str] = None  # None: <output>.rejects.jsonl
    torch_threads: Optional[int] = None
    verify_checkpoint: bool = True  # SHA-256 checksums checked before loading; false: skip (huge checkpoints)
    seed: int = 1234  # response i of prompt p is sampled with seed (seed, p, i): reruns and layouts agree
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self) -> None:
        require(Path(self.input).is_file(), "input", self.input, "no such file", "pass input=<labelled conversations>")
        for key in ("steerlm_checkpoint", "plain_sft_checkpoint", "apm_checkpoint"):
            require(
                Path(getattr(self, key)).is_dir(),
                key,
                getattr(self, key),
                "is not a directory",
                f"pass {key}=<a training output_dir or one of its checkpoints/step_* directories>",
            )
        require_distinct_output(self.output, self.input)
        require(
            self.num_responses >= 2,
            "num_responses",
            self.num_responses,
            "SteerLM 2.0 weighs responses against each other; one response has weight 1 and teaches nothing",
            "sample num_responses>=2 (NeMo-Aligner's runs use several)",
        )
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0 to sample", "use 1.0")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0", "use 0 (off)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]", "use 1.0 (off)")
        require(
            self.attribute_concentration > 0,
            "attribute_concentration",
            self.attribute_concentration,
            "must be > 0",
            "use 20",
        )
        for key in ("max_new_tokens", "shard_size", "micro_batch_size"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be positive", "use e.g. 256 / 200 / 16")
        if self.max_prompts is not None:
            require(self.max_prompts >= 1, "max_prompts", self.max_prompts, "must be positive", "or null for all")
        if self.torch_threads is not None:
            require(self.torch_threads >= 1, "torch_threads", self.torch_threads, "must be >= 1", "or null")
        self.parallel.validate()
        self.precision.validate()
        validate_generation_layout(self.parallel, "sampling with the KV-cache generator")
