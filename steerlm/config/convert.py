"""Configuration of `recipes/convert.py`: steerlm checkpoints to Hugging Face directories and back.

`input` is a steerlm run directory or checkpoint (written at any TP/PP) or a Hugging Face Llama directory;
`to` defaults to the other format. The export reads the checkpoint at `parallel`'s layout (launch that many
processes with torchrun and each writes the tensors it holds) and writes safetensors, config.json,
generation_config.json, the tokenizer with a SteerLM chat template and a model card. The import writes a
steerlm checkpoint (weights only) from `parallel`'s layout; so does a steerlm checkpoint with `to=steerlm` (its
weights alone: no optimizer state, a LoRA run's adapters merged with their base). `attributes` and
`system_prompt` are the exported chat template's default request, with the meaning they have for
`recipes/serve.py`. `to=nemo` writes a NeMo 1.x `.nemo` archive (`output=x.nemo`; any other name: the directory it
extracts to), `to=nemo_lora` a LoRA run's adapters alone as NeMo's PEFT archive; between two formats that are
not steerlm's (a `.nemo` to hf or peft, hf to nemo) the conversion runs through a temporary steerlm checkpoint.
See docs/deploying.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from steerlm.config.schema import DType, ParallelConfig
from steerlm.config.sources import is_hf_model_dir, is_nemo_archive
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.errors import require, require_distinct_output

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


class ModelFormat(str, Enum):
    steerlm = "steerlm"  # a run directory (its checkpoints/latest) or one checkpoints/step_* directory
    hf = "hf"  # a Hugging Face Llama directory: config.json + *.safetensors (+ tokenizer files)
    nemo = "nemo"  # a NeMo 1.x .nemo archive (or its unpacked directory): in, or out with to=nemo
    peft = "peft"  # a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors): export only
    nemo_lora = "nemo_lora"  # NeMo 1.x's PEFT archive of a LoRA run's adapters alone: export only


def input_format(path: Path) -> ModelFormat:
    """What kind of model directory (or archive) `path` is, from the files that mark each format: a `.nemo` by
    `config.sources.is_nemo_archive` (the rule `init_from` and serving use), or by its suffix, so that a damaged
    or missing `x.nemo` is refused by the NeMo reader naming what is wrong with it."""
    if path.suffix == ".nemo" or is_nemo_archive(path):
        return ModelFormat.nemo
    if is_hf_model_dir(path):
        return ModelFormat.hf
    return ModelFormat.steerlm


def parse_size(key: str, text: str) -> int:
    """Bytes of a size written as save_pretrained's `max_shard_size` is ("5GB", "500MB", "2GiB", or bytes)."""
    match = _SIZE.match(str(text))
    require(
        match is not None,
        key,
        text,
        "is not a size",
        f'write it like "5GB", "500MB" or "2GiB" (units {", ".join(unit for unit in _UNITS if unit)})',
    )
    assert match is not None
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    size = int(number * _UNITS[unit])
    require(size > 0, key, text, "must be positive", 'use e.g. "5GB"')
    return size


@dataclass
class ConvertConfig:
    input: str = MISSING  # a steerlm run dir / checkpoint, or a Hugging Face Llama directory
    output: str = MISSING  # a new directory (an existing one must be empty)
    # null: the other format than input's (steerlm → hf, hf/nemo → steerlm); steerlm → steerlm: the weights alone
    to: Optional[ModelFormat] = None
    max_shard_size: str = "5GB"  # to=hf: larger exports split over model-0000N-of-0000M.safetensors + an index
    dtype: Optional[DType] = None  # to=hf / to=steerlm / from .nemo: the written tensors' dtype; null: as trained
    tokenizer_path: Optional[str] = None  # to=hf/steerlm: null: the checkpoint's tokenizer; from .nemo: the archive's
    attributes: dict[str, Optional[float]] = field(default_factory=dict)  # to=hf: the chat template's defaults
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # to=hf: the chat template's system prompt when a request has none
    apm_range: Optional[list[float]] = None  # to=steerlm of another tool's reward model: [min, max] of its scores
    base: Optional[str] = None  # input a NeMo LoRA archive (PEFT training's adapters alone): the .nemo model they adapt
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    torch_threads: Optional[int] = None  # None: torch's default

    @property
    def source(self) -> ModelFormat:
        return input_format(Path(self.input))

    @property
    def target(self) -> ModelFormat:
        if self.to is not None:
            return self.to
        return ModelFormat.hf if self.source == ModelFormat.steerlm else ModelFormat.steerlm

    @property
    def max_shard_bytes(self) -> int:
        return parse_size("max_shard_size", self.max_shard_size)

    def validate(self) -> None:
        path = Path(self.input)
        require(
            path.exists(),
            "input",
            self.input,
            "does not exist",
            "pass a steerlm training output_dir or checkpoint, a Hugging Face Llama directory or a .nemo archive",
        )
        require(
            self.target != self.source or self.source == ModelFormat.steerlm,
            "to",
            self.target.value,
            f"input is already in the {self.source.value} format",
            f"leave to unset (input {self.source.value} converts to "
            f"{'hf' if self.source == ModelFormat.steerlm else 'steerlm'})",
        )
        output = Path(self.output)
        require(
            not output.exists() or (output.is_dir() and not any(output.iterdir())),
            "output",
            self.output,
            "exists and is not an empty directory",
            "choose a new output directory (a conversion never writes over another model)",
        )
        require_distinct_output(self.output, self.input)
        parse_size("max_shard_size", self.max_shard_size)
        if self.apm_range is not None:
            require(
                len(self.apm_range) == 2 and self.apm_range[0] < self.apm_range[1],
                "apm_range",
                self.apm_range,
                "must be [min, max] with min < max",
                "give the range of the reward model's scores, e.g. apm_range=[0,4]",
            )
        if self.base is not None:
            self._validate_base()
        self.parallel.validate()

    def _validate_base(self) -> None:
        require(
            self.source == ModelFormat.nemo,
            "base",
            self.base,
            "is the model a NeMo LoRA archive's adapters adapt, but input is not a .nemo archive",
            "pass the NeMo LoRA archive as input, or leave base unset",
        )
        base = Path(str(self.base))
        require(
            base.exists() and input_format(base) == ModelFormat.nemo,
            "base",
            self.base,
            "is not a .nemo archive" if base.exists() else "does not exist",
            "pass the .nemo model the adapters were trained on (the restore_from_path of NeMo's PEFT training)",
        )
        require(
            self.dtype is None or self.target != ModelFormat.steerlm,
            "dtype",
            self.dtype.value if self.dtype is not None else None,
            "does not apply to LoRA adapters on a base: they are saved in the base's dtype",
            "leave dtype unset (convert the result with to=steerlm dtype=… for merged weights in another dtype)",
        )
