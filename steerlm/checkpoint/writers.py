"""Checkpoint writer processes die with the process that forked them.

A dist-checkpoint save forks one writer process per file bucket (megatron's
`FileSystemWriterAsync.write_preloaded_data_multiproc`, run synchronously by the saving process). When the
training process is killed with -9 mid-save, nothing stops those writers: they finish writing into the
temporary directory nobody will publish, then block for minutes on a results queue nobody reads, holding
their copy of the state and the parent's open files. Every process forked while `writers_die_with_parent()`
is active asks the kernel (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`) to be killed when its parent dies, and
exits at once if the parent died before it could ask. Elsewhere (no prctl) the context does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1
_parent: int | None = None  # the pid whose children must die with it, while a save runs
_registered = False


def _die_with_parent() -> None:
    """In a child just forked: ask for SIGKILL when the parent dies (its own children then do the same)."""
    global _parent
    if _parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != _parent:  # the parent died between fork and prctl: nobody will read what we write
        os._exit(1)
    _parent = os.getpid()


@contextlib.contextmanager
def writers_die_with_parent() -> Iterator[None]:
    """Processes forked inside this block are killed when this process dies (Linux; a no-op elsewhere)."""
    global _parent, _registered
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _registered:
        os.register_at_fork(after_in_child=_die_with_parent)
        _registered = True
    _parent = os.getpid()
    try:
        yield
    finally:
        _parent = None
