"""Configuration of steering at inference: the chat CLI (`recipes/chat.py`) and the OpenAI-compatible
server (`recipes/serve.py`).

Both load one SFT checkpoint and steer it with attribute values. `attributes` holds the values every
prompt starts from (a request or `/set` changes them one by one); it is checked against the
checkpoint's schema when the model loads, because only the checkpoint knows its schema. The shipped
YAMLs list the attribute names of the shipped schemas with the value null (unset), so that
`attributes.verbosity=4` is a plain override; a custom schema's names are added with
`+attributes.NAME=VALUE`. Attributes set nowhere are left out of the attribute string, as for a partly
labelled turn in training. Sampling defaults use the OpenAI request's names, so a config value and a
request field read the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import ParallelConfig, PrecisionConfig, is_nemo_archive
from steerlm.config.validation import validate_generation_layout
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.errors import ConfigError

SEED_LIMIT = 2**63  # sampling seeds are non-negative 64-bit signed integers
TOP_K_LIMIT = 2**63  # top_k is held as a 64-bit signed integer
MIN_TEMPERATURE = 1e-3  # a positive temperature below this overflows the scaled logits (0: greedy)
MIN_TOP_P = 1e-6  # a top_p below this vanishes in float32 (top_k=1 keeps the most likely token)
MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# Tokens (rows x positions) one forward of a prefill computes at most: longer prefills run in chunks, so their
# transients stay bounded however many long prompts join at once (steerlm.inference.decoders.LeanDecoder._prefill).
PREFILL_TOKENS = 8192


@dataclass
class SamplingDefaults:
    """What a request gets for the sampling fields it leaves out."""

    max_tokens: int = 256  # new tokens per response
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: list[str] = field(default_factory=list)  # besides the template's end of turn, always a stop
    seed: int = 0  # per-request sampling seed (a request's `seed` replaces it)

    def validate(self) -> None:
        checks = (
            ("max_tokens", self.max_tokens >= 1, "must be >= 1", "use e.g. 256"),
            (
                "temperature",
                self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= 2.0,
                f"must be 0 or in [{MIN_TEMPERATURE:g}, 2]",
                "use 0 for greedy decoding",
            ),
            (
                "top_p",
                MIN_TOP_P <= self.top_p <= 1.0,
                f"must be in [{MIN_TOP_P:g}, 1]",
                "use 1.0 to switch nucleus sampling off",
            ),
            ("top_k", 0 <= self.top_k < TOP_K_LIMIT, "must be in [0, 2**63)", "use 0 to switch top-k off"),
            ("seed", 0 <= self.seed < SEED_LIMIT, "must be in [0, 2**63)", "use e.g. 0"),
            (
                "stop",
                all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty",
                "remove the empty string",
            ),
        )
        for key, ok, problem, fix in checks:
            if not ok:
                raise ConfigError(f"sampling.{key}", getattr(self, key), problem, fix)


@dataclass
class InferenceConfig:
    """What chat and serve share: the checkpoint, the layout, and the default steering."""

    checkpoint: str = MISSING  # an SFT run directory (its checkpoints/latest), one checkpoint, or a .nemo model
    tokenizer_path: Optional[str] = None  # None: the tokenizer directory the checkpoint was trained with
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    attributes: dict[str, Optional[float]] = field(default_factory=dict)  # name → value (null: unset)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # when a request has none (NeMo-Aligner's, which SteerLM data carries)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    seed: int = 1234  # runtime seed (weights are loaded, so it only matters to megatron's RNG set-up)
    verify_checkpoint: bool = True  # SHA-256 checksums checked before loading; false: skip (huge checkpoints)
    torch_threads: Optional[int] = None  # None: torch's default
    ping_interval_s: float = 30.0  # under TP an idle rank 0 touches the other ranks this often (collective timeouts)

    def validate(self) -> None:
        if not (Path(self.checkpoint).is_dir() or is_nemo_archive(Path(self.checkpoint))):
            raise ConfigError(
                "checkpoint",
                self.checkpoint,
                "is not a directory or a .nemo archive",
                "pass the output_dir of recipes/train_sft.py (or one of its checkpoints/step_*), or a NeMo .nemo model",
            )
        self.parallel.validate()
        self.precision.validate()
        self.sampling.validate()
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("torch_threads", self.torch_threads, "must be >= 1", "use null for torch's default")
        timeout_s = 60 * self.parallel.distributed_timeout_minutes
        if not 0 < self.ping_interval_s < timeout_s:
            raise ConfigError(
                "ping_interval_s",
                self.ping_interval_s,
                f"must be positive and below parallel.distributed_timeout_minutes ({timeout_s} s), or "
                "an idle server's other ranks time out",
                "use 30",
            )
        validate_generation_layout(self.parallel, "KV-cache generation")


@dataclass
class ChatConfig(InferenceConfig):
    """`recipes/chat.py`: an interactive conversation on the terminal."""


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: int = 8000
    model_name: Optional[str] = None  # the `model` clients send; None: the checkpoint's run directory name
    shutdown_timeout_s: float = 30.0  # on SIGTERM/Ctrl-C, in-flight requests get this long to finish

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError("server.port", self.port, "is not a TCP port", "use e.g. 8000")
        if self.shutdown_timeout_s <= 0:
            raise ConfigError("server.shutdown_timeout_s", self.shutdown_timeout_s, "must be positive", "use e.g. 30")


class BatchingPolicy(str, Enum):
    continuous = "continuous"  # requests join the running batch at every step and leave it when done
    static = "static"  # batch-at-a-time: requests join only an empty batch (for comparison)


@dataclass
class ServeLimits:
    """What one request may ask for and how much work the server holds."""

    max_request_bytes: int = 1_000_000  # larger bodies are refused with 413
    max_tokens: int = 1024  # cap on a request's max_tokens (larger: 400, never silently lowered)
    max_n: int = 8  # cap on a request's n (responses per request)
    max_stop_strings: int = 4  # cap on a request's stop strings (OpenAI's)
    max_stop_chars: int = 256  # cap on the total length of a request's stop strings
    max_batch_size: int = 16  # rows decoded together; waiting requests join as rows finish
    max_queue: int = 64  # requests waiting for the model; more are refused with 429
    request_timeout_s: float = 300.0  # a request not finished this long after it arrived gets 503
    batching: BatchingPolicy = BatchingPolicy.continuous
    prefill_tokens: int = PREFILL_TOKENS  # tokens one prefill forward computes at most (longer ones run in chunks)

    def validate(self) -> None:
        for key in (
            "prefill_tokens",
            "max_request_bytes",
            "max_tokens",
            "max_n",
            "max_stop_strings",
            "max_stop_chars",
            "max_batch_size",
            "max_queue",
            "request_timeout_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"limits.{key}", getattr(self, key), "must be positive", "use the default")
        if self.max_n > self.max_batch_size:
            raise ConfigError(
                "limits.max_n",
                self.max_n,
                f"exceeds limits.max_batch_size={self.max_batch_size}: such a request never fits a batch",
                "lower limits.max_n or raise limits.max_batch_size",
            )


PROFILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class ProfileConfig:
    """One team's way of using the served model: the attribute values its requests start from (over the
    server's `attributes`; null unsets one), the system prompt for requests without one, caps at or below
    the server's `limits`, and its own LoRA adapters. A request picks it with `"model": "<model>:<profile>"` or
    `"profile"`, or gets it from its API key."""

    attributes: dict[str, Optional[float]] = field(default_factory=dict)
    system_prompt: Optional[str] = None  # None: the server's system_prompt
    max_tokens: Optional[int] = None  # None: limits.max_tokens
    max_n: Optional[int] = None  # None: limits.max_n
    # LoRA adapters (a checkpoint of the adapters alone, trained on the served checkpoint) this profile's answers use
    adapter: Optional[str] = None

    def validate(self, name: str, limits: ServeLimits) -> None:
        if not PROFILE_NAME.fullmatch(name):
            raise ConfigError(
                f"profiles.{name}", name, "is not a profile name (letters, digits, _ . -)", "rename the profile"
            )
        for key in ("max_tokens", "max_n"):
            value, cap = getattr(self, key), getattr(limits, key)
            if value is not None and not 1 <= value <= cap:
                raise ConfigError(
                    f"profiles.{name}.{key}", value, f"must be in [1, limits.{key}={cap}]", "lower it, or null"
                )


@dataclass
class ServeConfig(InferenceConfig):
    """`recipes/serve.py`: the OpenAI-compatible HTTP server with the `attributes` extension."""

    apm_checkpoint: Optional[str] = None  # an APM run directory: enables POST /v1/attributes/score
    server: ServerOptions = field(default_factory=ServerOptions)
    limits: ServeLimits = field(default_factory=ServeLimits)
    profiles: dict[str, ProfileConfig] = field(default_factory=dict)  # name → preset (docs/inference.md)
    api_keys: Optional[str] = None  # a file of `KEY [PROFILE]` lines: requests then need `Authorization: Bearer KEY`

    def validate(self) -> None:
        super().validate()
        self.server.validate()
        self.limits.validate()
        for name, profile in self.profiles.items():
            profile.validate(name, self.limits)
        if self.api_keys is not None and not Path(self.api_keys).is_file():
            raise ConfigError(
                "api_keys",
                self.api_keys,
                "is not a file",
                "write one `KEY` or `KEY PROFILE` per line (docs/inference.md), or null for no authentication",
            )
        if self.apm_checkpoint is not None and not Path(self.apm_checkpoint).is_dir():
            raise ConfigError(
                "apm_checkpoint",
                self.apm_checkpoint,
                "is not a directory",
                "pass the output_dir of recipes/train_attribute_model.py, or null for no scoring",
            )
        if self.sampling.max_tokens > self.limits.max_tokens:
            raise ConfigError(
                "sampling.max_tokens",
                self.sampling.max_tokens,
                f"exceeds limits.max_tokens={self.limits.max_tokens}",
                "lower the default or raise the cap",
            )
        stop = self.sampling.stop
        if len(stop) > self.limits.max_stop_strings or sum(map(len, stop)) > self.limits.max_stop_chars:
            raise ConfigError(
                "sampling.stop",
                stop,
                f"exceeds limits.max_stop_strings={self.limits.max_stop_strings} or "
                f"limits.max_stop_chars={self.limits.max_stop_chars}",
                "use fewer or shorter stop strings, or raise the caps",
            )
        if self.sampling.seed > SEED_LIMIT - self.limits.max_n:
            raise ConfigError(
                "sampling.seed",
                self.sampling.seed,
                f"choice i samples with seed + i: with limits.max_n={self.limits.max_n} the seed must be at most "
                f"2**63 - {self.limits.max_n}",
                "use e.g. 0",
            )
