"""A process's lifetime tied to its parent's, so that no stage or rank outlives what started it.

The pipeline starts each stage with it, and a rank that torchrun started asks for it when it initialises: torchrun
starts its workers in sessions of their own, so a `kill -9` of the agent (or of its whole process group) left them
running, still writing the stage's output beside the rerun's own ranks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when the thread that started it exits, even by `kill -9` (Linux's
    `prctl(PR_SET_PDEATHSIG)`; nothing elsewhere). A training stage checkpoints on SIGTERM, so a rerun resumes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def started_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) names the run in each worker's environment."""
    return "TORCHELASTIC_RUN_ID" in os.environ
