"""Run a function on N gloo ranks in new processes, the way torchrun would set them up.

The ranks are forked from a multiprocessing forkserver: one server process per test worker imports torch,
megatron-core and steerlm once, and each rank starts from it with those modules loaded. Started with `spawn`, every
rank imported them afresh, about 4 s of CPU a rank on the CI machines (2026-12-06, the Intel Xeon: the four tests
`pytest tests/test_generate.py -k "pipelined_generation_gives and tied_mha or tp2_generates_what_tp1_generates"`
select start 18 ranks in all, and took 59.7 s spawned, 16.0 s forked, the server's start included). A forked
rank gets the caller's environment and working directory as they are at the call, as a spawned one did, not the
server's."""

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
mp.set_forkserver_preload(
    ["torch", "megatron.core", "steerlm.megatron_compat", "steerlm.runtime", "steerlm.models", "steerlm.inference"]
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, out_dir: str, env: dict, cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
            args=(fn, world_size, _free_port(), args, out_dir, dict(os.environ), os.getcwd()),
            nprocs=world_size,
            start_method="forkserver",
            join=True,
        )
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
