"""Deterministic global batches: the rows of step k depend only on (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch


def held_out(source: str, fraction: float) -> bool:
    """Whether a row (by its `file:line` source) belongs to the validation share: a hash of the file's
    name and the line, so every stage and every rerun holds out the same rows of a file, wherever the
    file lies."""
    path, _, line = source.rpartition(":")
    return zlib.crc32(f"{Path(path).name}:{line}".encode()) % 1000 < fraction * 1000


def global_batch_indices(num_rows: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of (1-based) `step`: a stream of per-epoch permutations, cut into global batches."""
    if num_rows <= 0:
        raise ValueError("no rows to sample from")
    start = (step - 1) * global_batch_size
    indices: list[int] = []
    while len(indices) < global_batch_size:
        epoch, offset = divmod(start + len(indices), num_rows)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.extend(order[offset : offset + global_batch_size - len(indices)].tolist())
    return indices
