"""Rank 0 drives, the other model-parallel ranks follow: how one application serves a TP-sharded model.

Every forward pass under tensor parallelism is collective, so each rank must make the same calls in
the same order. Rank 0 (which runs the CLI or HTTP server) announces each call — a handler name and
its arguments — with one object broadcast; the other ranks sit in `follow()` and execute what they are
told. A handler that returns an iterator (a generation stream) is drained by the followers as rank 0
consumes it, step for step.

A follower waits inside a collective, and collectives time out (`parallel.distributed_timeout_minutes`),
so an idle rank 0 calls `ping()` now and then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.distributed as dist

from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)
_PING, _CLOSE = "__ping__", "__close__"


class Lockstep:
    def __init__(self, layout: ParallelLayout, handlers: Mapping[str, Callable[..., Any]]) -> None:
        if layout.dp != 1 or layout.pp != 1:
            raise ValueError(f"lockstep serving needs every rank in one tensor-parallel group; got {layout.describe()}")
        self.layout = layout
        self.handlers = dict(handlers)
        self.closed = False

    def _announce(self, message: tuple | None) -> tuple:
        """Rank 0 sends `message`; the others pass None and receive it."""
        holder = [message]
        if self.layout.world_size > 1:
            dist.broadcast_object_list(holder, src=0)
        received = holder[0]
        if received is None:
            raise RuntimeError("lockstep: no message from rank 0 (follow() needs more than one rank)")
        return received

    def call(self, name: str, *args: Any) -> Any:
        """Rank 0: run `handlers[name](*args)` on every rank; returns rank 0's result (drain iterators fully)."""
        if not self.layout.is_rank_zero:
            raise RuntimeError("only rank 0 calls; the other ranks run follow()")
        if name not in self.handlers:
            raise KeyError(f"no handler {name!r}; registered: {sorted(self.handlers)}")
        self._announce((name, args))
        return self.handlers[name](*args)

    def ping(self) -> None:
        if self.layout.world_size > 1 and not self.closed:
            self._announce((_PING, ()))

    def close(self) -> None:
        """Rank 0: release the followers (their `follow()` returns). Idempotent."""
        if not self.closed and self.layout.world_size > 1:
            self._announce((_CLOSE, ()))
        self.closed = True

    def follow(self) -> None:
        """Ranks other than 0: execute rank 0's calls until it closes."""
        while True:
            name, args = self._announce(None)
            if name == _CLOSE:
                return
            if name == _PING:
                continue
            try:
                result = self.handlers[name](*args)
                if isinstance(result, Iterator):
                    for _ in result:
                        pass
            except Exception as error:  # noqa: BLE001 - rank 0 hit the same deterministic error and reports it
                log.debug("rank %d: %s failed as on rank 0: %s", self.layout.rank, name, error)
