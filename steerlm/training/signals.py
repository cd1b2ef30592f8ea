"""Graceful stop: SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) and a wall-time limit.

The handler only records the request; the loop finishes the current step, all ranks agree to stop at
the same step (a MAX all-reduce), a checkpoint is written and the job exits 0.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Context manager installing the handlers; `should_stop()` is collective (call on every rank)."""

    def __init__(self, max_time_minutes: float | None, device: torch.device) -> None:
        self.deadline = None if max_time_minutes is None else time.monotonic() + 60.0 * max_time_minutes
        self.device = device
        self.received: int | None = None
        self.reason = ""
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        local = 0
        if self.received is not None:
            local, self.reason = 1, f"received {signal.Signals(self.received).name}"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local, self.reason = 1, "trainer.max_time_minutes reached"
        flag = torch.tensor([local], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.reason:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())
