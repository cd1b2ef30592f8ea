"""Files that appear whole or not at all: the one atomic-write helper every layer uses.

An interrupted run must never leave a truncated file that looks finished (a config, a manifest, a shard of
annotations, a vocabulary): everything is written to a temporary name in the same directory, fsynced, then
`os.replace`d over the target.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TextIO


class AtomicTextFile:
    """A UTF-8 text file that appears at `path` only when closed without an exception.

    Written to a temporary name in the same directory, fsynced, then `os.replace`d over `path`; on an
    exception the temporary file is removed and `path` is left as it was.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file: TextIO | None = None

    def __enter__(self) -> AtomicTextFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "w", encoding="utf-8", newline="\n")
        return self

    def write(self, text: str) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: write outside its `with` block")
        self._file.write(text)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            if exc_type is None:
                file.flush()
                os.fsync(file.fileno())
            file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating its directory; returns the path."""
    with AtomicTextFile(path) as file:
        file.write(text)
    return Path(path)
