"""Weights steerlm reads besides its own checkpoints, and the base model an adapters-only checkpoint names.

A run starts from a steerlm checkpoint, a Hugging Face Llama directory or a NeMo `.nemo` model (`init_from`); a LoRA
run that saves its adapters alone (`lora.checkpoint`) records that source as its `BaseWeights`, and every later read
of its checkpoints reads the base first, then the adapters on top. The base is identified by a fingerprint of the
files that hold its weights (each file's path, size and first and last MiB: a few MiB read even for a 140 GB model),
so a base replaced or rewritten since the run saved is refused, naming its path, instead of silently adapted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from steerlm.checkpoint.integrity import CheckpointError
from steerlm.config.schema import ModelConfig
from steerlm.models.hf_llama import SafetensorsWeights, hf_to_megatron
from steerlm.models.nemo_weights import NemoCheckpoint
from steerlm.models.sharding import load_full_parameters, named_global_parameters

log = logging.getLogger(__name__)

_MIB = 1 << 20


class WeightFormat(str, Enum):
    steerlm = "steerlm"
    hugging_face = "Hugging Face"
    nemo = "NeMo"


# The files whose bytes are a source's weights and shapes (an HF directory may also hold a tokenizer, a README …)
_HF_WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")


def _weight_files(format: WeightFormat, path: Path) -> Iterator[Path]:
    if path.is_file():  # a .nemo tar
        yield path
    elif format == WeightFormat.hugging_face:
        yield from sorted({file for pattern in _HF_WEIGHT_FILES for file in path.glob(pattern)})
    else:  # a steerlm checkpoint or an extracted .nemo: every file is part of the weights
        yield from sorted(file for file in path.rglob("*") if file.is_file())


def fingerprint(format: WeightFormat, path: Path) -> str:
    """SHA-256 over each weight file's relative path, size, first MiB and last MiB."""
    digest = hashlib.sha256()
    for file in _weight_files(format, path):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(_MIB))
            if size > 2 * _MIB:
                handle.seek(size - _MIB)
                digest.update(handle.read(_MIB))
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseWeights:
    """The frozen weights an adapters-only checkpoint adapts: where they are, in which format, and their
    fingerprint when the run started from them."""

    format: str  # a WeightFormat value
    path: str  # absolute
    fingerprint: str

    @classmethod
    def of(cls, format: WeightFormat, path: Path) -> BaseWeights:
        return cls(format.value, str(Path(path).resolve()), fingerprint(format, Path(path)))

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format)

    def check(self, checkpoint: Path) -> None:
        """Refuse, naming the base's path, a base that is gone or no longer the one `checkpoint` was trained on."""
        path = Path(self.path)
        fix = f"put the {self.weight_format.value} model that run started from back at {path} (a symbolic link will do)"
        if not path.exists():
            raise CheckpointError(path, f"is missing: {checkpoint} holds LoRA adapters alone, trained on it", fix)
        if fingerprint(self.weight_format, path) != self.fingerprint:
            raise CheckpointError(
                path,
                f"has changed since {checkpoint} was saved (its weight files' fingerprint differs); that checkpoint "
                "holds LoRA adapters alone, trained on the model that was there",
                fix,
            )


def read_foreign_weights(
    format: WeightFormat,
    path: Path,
    chunks: list,
    tp_rank: int,
    tp: int,
    model: ModelConfig,
    keep: Callable[[str], bool],
) -> None:
    """Copy a Hugging Face directory's or a `.nemo` model's weights into this rank's shards (any layout); parameters
    whose global name `keep` accepts are left as they are."""
    if format == WeightFormat.hugging_face:
        names = [name for name, _ in named_global_parameters(chunks) if not keep(name)]
        weights = SafetensorsWeights(path)
        if weights.left_out:  # a multimodal Gemma 3's vision tower and projector
            log.info("%s: its language model alone is loaded; left out: %d tensors", path, len(weights.left_out))
        load_full_parameters(chunks, hf_to_megatron(weights, model, names), tp_rank, tp, keep=keep)
    elif format == WeightFormat.nemo:
        with NemoCheckpoint(path) as archive:
            archive.load_into(chunks, tp_rank, tp, keep=keep)
    else:
        raise ValueError(f"{format} is not a foreign format")
