"""Checkpoint integrity: a checksum of every file, written last at save and verified before a load.

dist_checkpointing reads whatever bytes a shard holds: 64 flipped bytes load without a word and train on
from damaged weights, a truncated shard or a garbled `.metadata` / `common.pt` fails deep inside torch
without naming the checkpoint. So a save ends by writing `checksums.json` (each file's size and SHA-256)
into the temporary directory, after every other file and before the directory is renamed into place: a
published checkpoint either lists all its files, or — written with `checkpoint.verify=false`, or by an
older steerlm — has no list at all. Hashing is shared over the ranks (each hashes every world-size-th
file, the results are gathered), so a sharded checkpoint costs each rank its share of the reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from steerlm.files import atomic_write_text

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = 1
READ_BYTES = 1 << 23


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the file, what is wrong with it and what to do."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}. Fix: {fix}")


def _file_digest(path: Path) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(READ_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _shared(names: list[str], compute: Callable[[str], T]) -> dict[str, T]:
    """`compute(name)` for every name, each computed by one rank (collective when distributed)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: compute(name) for name in names[rank::world]}
    if world == 1:
        return mine
    parts: list[dict[str, T] | None] = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: value for part in parts if part for name, value in part.items()}


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.is_file() and path.name != CHECKSUMS)


def file_digests(paths: list[Path]) -> dict[str, dict]:
    """Each file's size and SHA-256 by name: what an asynchronous save's writer process computes of the files it
    has just written, while training goes on, for `write_checksums`."""
    return {path.name: _file_digest(path) for path in paths}


def write_checksums(directory: Path, known: dict[str, dict] | None = None) -> None:
    """Collective: list every file of `directory` with its size and SHA-256 in `checksums.json` (rank 0
    writes it, atomically). Call after every other file of the checkpoint is written. `known`: digests this
    rank already has (`file_digests` of the files it wrote); every other file is hashed here, shared over ranks."""
    known = dict(known or {})
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, known)
        known = {name: digest for part in parts if part for name, digest in part.items()}
    rest = [name for name in _files(directory) if name not in known]
    digests = {**known, **_shared(rest, lambda name: _file_digest(directory / name))}
    if not dist.is_initialized() or dist.get_rank() == 0:
        payload = {"format": CHECKSUMS_FORMAT, "algorithm": "sha256", "files": dict(sorted(digests.items()))}
        atomic_write_text(directory / CHECKSUMS, json.dumps(payload, indent=1) + "\n")


def read_checksums(directory: Path) -> dict[str, dict] | None:
    """The saved size and SHA-256 of each file, or None when the checkpoint has no checksums.json."""
    path = directory / CHECKSUMS
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str) for entry in files.values()):
            raise TypeError("an entry lacks bytes or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            path,
            f"cannot be read ({type(error).__name__}: {error})",
            "the checkpoint's file list is damaged: delete this checkpoint directory (resume then uses the "
            "previous one) or set checkpoint.verify=false to load it unchecked",
        ) from None
    return files


def _problem(directory: Path, name: str, saved: dict) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"is missing (listed in {CHECKSUMS})"
    try:
        size = path.stat().st_size
        if size != saved["bytes"]:
            return f"has {size} bytes, {saved['bytes']} when it was saved: the file was truncated or changed"
        if _file_digest(path)["sha256"] != saved["sha256"]:
            return f"its content differs from the SHA-256 recorded at save ({CHECKSUMS}): the file is corrupt"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def verify_checksums(directory: Path) -> bool:
    """Collective: compare every listed file with its checksum; False when there is no list to compare with.

    Raises CheckpointError naming the first damaged file (the same on every rank).
    """
    saved = read_checksums(directory)
    if saved is None:
        return False
    problems = _shared(sorted(saved), lambda name: _problem(directory, name, saved[name]))
    for name, problem in sorted(problems.items()):
        if problem is not None:
            raise CheckpointError(
                directory / name,
                problem,
                "delete this checkpoint directory (resume then uses the previous one) or restore it from a copy",
            )
    return True


def checkpoint_identity(directory: Path) -> str:
    """A short digest that changes whenever any file of the checkpoint changes: the SHA-256 of its
    checksums.json; for a checkpoint without one, of its files' names and sizes (weaker: an edit that keeps a
    file's size goes unseen)."""
    listing = directory / CHECKSUMS
    if listing.exists():
        return hashlib.sha256(listing.read_bytes()).hexdigest()[:16]
    sizes = {name: (directory / name).stat().st_size for name in _files(directory)}
    return hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:16]
