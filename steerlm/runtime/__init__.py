"""Distributed runtime: process groups, the parallel layout, seeding, the CPU compatibility layer.

Only this package talks to megatron.core.parallel_state.
"""

from steerlm.runtime.distributed import (
    detect_accelerator,
    inference,
    initialize,
    launch_world_size,
    seed_everything,
    shutdown,
    worker_thread,
)
from steerlm.runtime.layout import ParallelLayout
from steerlm.runtime.logs import setup_logging

__all__ = [
    "ParallelLayout",
    "setup_logging",
    "detect_accelerator",
    "inference",
    "initialize",
    "launch_world_size",
    "seed_everything",
    "shutdown",
    "worker_thread",
]
