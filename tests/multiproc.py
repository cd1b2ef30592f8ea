"""Run a function on N gloo ranks in spawned processes, the way torchrun would set them up."""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

HANG_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # A hung collective becomes a traceback instead of a silent CI timeout.
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call `fn(*args)` on `world_size` spawned ranks; returns each rank's return value, in rank order.

    An exception on any rank fails the call with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, world_size, _free_port(), args, out_dir),
            nprocs=world_size,
            start_method="spawn",
            join=True,
        )
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
