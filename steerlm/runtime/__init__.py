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

__all__ = [
    "ParallelLayout",
    "detect_accelerator",
    "inference",
    "initialize",
    "launch_world_size",
    "seed_everything",
    "shutdown",
    "worker_thread",
]
