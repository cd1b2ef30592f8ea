"""CPU threads a running stage may use, raised while it runs when the pipeline frees cores.

The pipeline runs the stages of a wave side by side and splits its threads among them (`OMP_NUM_THREADS`). The
stages of a wave rarely end together — on the knowledge route the APM ends after ~3 minutes while the Bayes
judge trains for ~15 more — and a core left idle for the rest of the wave is a core wasted: the judge's step
takes ~120 ms at one thread and ~83 ms at two (docs/performance.md, "The judge's training step"). So the
pipeline writes each stage's share to a file named by `STEERLM_THREADS_FILE` and rewrites it when a wave-mate
finishes; the training loop reads it between steps (`ThreadShare.poll`) and calls `torch.set_num_threads`. How
many threads a stage has never changes its numbers (tests/test_pipeline.py: bitwise the same weights), so when
the change lands does not matter either.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from steerlm.errors import ConfigError
from steerlm.files import atomic_write_text

log = logging.getLogger(__name__)

THREADS_FILE = "STEERLM_THREADS_FILE"  # the environment variable naming the file
POLL_SECONDS = 1.0  # at most one read per second: the loop polls every step


def read_share(path: Path) -> int | None:
    """The thread count in `path` (one positive integer), or None while the file does not exist."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            THREADS_FILE,
            str(path),
            f"holds {text!r}, not a positive thread count",
            "write one integer >= 1 to the file, or unset the variable",
        )
    return int(text)


def write_share(path: Path, threads: int) -> None:
    """Set the share a stage following `path` takes at its next poll (written atomically, so a poll never reads
    half a number)."""
    atomic_write_text(path, f"{threads}\n")


class ThreadShare:
    """Follows a share file (`from_environment`: the one `STEERLM_THREADS_FILE` names; None: nothing to follow)."""

    def __init__(self, path: Path | None, every: float = POLL_SECONDS) -> None:
        self.path = path
        self.every = every
        self._next = 0.0

    @classmethod
    def from_environment(cls) -> ThreadShare:
        return cls(Path(os.environ[THREADS_FILE]) if os.environ.get(THREADS_FILE) else None)

    def poll(self) -> int | None:
        """Apply the file's share if it differs from this process's thread count (the file is read at most once
        every `every` seconds); the new count, else None."""
        if self.path is None or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every
        threads = read_share(self.path)
        if threads is None or threads == torch.get_num_threads():
            return None
        log.info("CPU threads %d -> %d (%s)", torch.get_num_threads(), threads, self.path)
        torch.set_num_threads(threads)
        return threads
