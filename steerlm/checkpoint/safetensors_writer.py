"""Hugging Face safetensors files written tensor by tensor, by any number of processes.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's dtype, shape and byte
range, then the tensors' bytes. All of that is known from names, shapes and dtypes alone, so the files are
planned before any weight is read: every rank computes the same plan, one rank writes the headers and sizes
the files, and whichever rank holds a tensor writes its bytes at the planned offset. No process ever holds
more than the tensor it is writing, and the bytes do not depend on the layout that wrote them (an export at
TP=2 or PP=2 is byte-identical to one at a single rank).

Above `max_file_bytes` the tensors are split over `model-00001-of-0000N.safetensors` files in plan order,
with `model.safetensors.index.json` mapping each tensor to its file, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlm.files import atomic_write_text

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_MAX_WRITE = 1 << 30  # os.pwrite writes at most ~2 GiB per call on Linux


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class PlannedFile:
    name: str
    header: bytes  # length prefix + JSON header, padded to 8 bytes
    offsets: dict[str, int]  # tensor name → absolute byte offset of its data in the file
    size: int


@dataclass(frozen=True)
class SafetensorsPlan:
    files: tuple[PlannedFile, ...]
    specs: dict[str, TensorSpec]

    def file_of(self, name: str) -> PlannedFile:
        for planned in self.files:
            if name in planned.offsets:
                return planned
        raise KeyError(f"tensor {name!r} is not in the export plan")

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())


def _header(specs: Sequence[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    relative, start = {}, 0
    for spec in specs:
        if spec.dtype not in _DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be exported (use fp32, bf16 or fp16)")
        end = start + spec.nbytes
        entries[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [start, end]}
        relative[spec.name], start = start, end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    header = struct.pack("<Q", len(text)) + text
    return header, {name: len(header) + offset for name, offset in relative.items()}


def plan_safetensors(specs: Sequence[TensorSpec], max_file_bytes: int) -> SafetensorsPlan:
    """Files holding `specs` in order, a new file whenever the next tensor would pass `max_file_bytes` (a
    larger tensor gets a file of its own); one file is named `model.safetensors`."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    files = []
    for number, group in enumerate(groups, start=1):
        name = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header, offsets = _header(group)
        files.append(PlannedFile(name, header, offsets, len(header) + sum(spec.nbytes for spec in group)))
    return SafetensorsPlan(tuple(files), {spec.name: spec for spec in specs})


def create_files(directory: Path, plan: SafetensorsPlan) -> None:
    """Write every file's header and size it (one process, before any `write_tensor`)."""
    for planned in plan.files:
        with open(Path(directory) / planned.name, "wb") as handle:
            handle.write(planned.header)
            handle.truncate(planned.size)


def write_tensor(directory: Path, plan: SafetensorsPlan, name: str, tensor: torch.Tensor) -> None:
    """Write one tensor's bytes at its planned place; its shape and dtype must be the planned ones."""
    spec = plan.specs.get(name)
    if spec is None:
        raise KeyError(f"tensor {name!r} is not in the export plan")
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(
            f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype} (the checkpoint "
            "does not have the shape its config describes)"
        )
    planned = plan.file_of(name)
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data.cast("B")
    descriptor = os.open(Path(directory) / planned.name, os.O_WRONLY)
    try:
        written, offset = 0, planned.offsets[name]
        while written < len(data):
            written += os.pwrite(descriptor, data[written : written + _MAX_WRITE], offset + written)
    finally:
        os.close(descriptor)


def write_index(directory: Path, plan: SafetensorsPlan) -> None:
    """`model.safetensors.index.json` for a plan of several files (nothing for one file)."""
    if len(plan.files) == 1:
        return
    index = {
        "metadata": {"total_size": plan.total_bytes},
        "weight_map": {name: planned.name for planned in plan.files for name in planned.offsets},
    }
    atomic_write_text(Path(directory) / INDEX_FILE, json.dumps(index, indent=2) + "\n")
