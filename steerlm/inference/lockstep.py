"""Rank 0 drives, the other model-parallel ranks follow: how one application serves a model split by tensor or
pipeline parallelism.

Every forward pass under tensor or pipeline parallelism is collective, so each rank must make the same calls in
the same order. Rank 0 (which runs the CLI or HTTP server) announces each call — a handler name and
its arguments — with one object broadcast; the other ranks sit in `follow()` and execute what they are
told. A serving engine announces one call per decoding step (`advance`, with the rows that join and
leave), so every rank keeps the same batch.

After each call the ranks tell each other how it went (one small all-reduce, and the messages only when
something failed). An error raised alike on every rank (a bad input, checked the same everywhere) is
rank 0's to report, and the ranks go on. A call that failed on some ranks but not others leaves their
states apart: every rank raises `RanksDiverged` (logged at ERROR with the failing rank's message on rank 0
and on that rank), rank 0 stops serving and the followers leave `follow()`, so no rank waits in a
collective for a partner that will never come.

A follower waits inside a collective, and collectives time out (`parallel.distributed_timeout_minutes`),
so an idle rank 0 calls `ping()` now and then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)
_PING, _CLOSE = "__ping__", "__close__"


class RanksDiverged(RuntimeError):
    """A call failed on some ranks and not on others: their states differ, serving must stop."""


class Lockstep:
    def __init__(self, layout: ParallelLayout, handlers: Mapping[str, Callable[..., Any]]) -> None:
        if layout.dp != 1:
            raise ValueError(f"lockstep serving needs every rank in one model replica; got {layout.describe()}")
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

    def _run(self, name: str, args: tuple) -> Any:
        """Run a handler on this rank, then settle with the others: raises this rank's error when every rank
        failed alike, `RanksDiverged` when they did not."""
        error: Exception | None = None
        result = None
        try:
            result = self.handlers[name](*args)
        except Exception as caught:  # noqa: BLE001 - settled with the other ranks below
            error = caught
        messages = self._gather(None if error is None else f"{type(error).__name__}: {error}")
        if len(set(messages)) > 1:
            failing = [r for r, m in enumerate(messages) if m is not None]
            rank = next((r for r in failing if r > 0), 0)  # a follower's own failure is the news
            message = messages[rank]
            self.closed = True  # the other ranks cannot be trusted to answer a close
            log.error("lockstep: %s failed on rank %d and not alike on every rank: %s", name, rank, message)
            raise RanksDiverged(f"{name} failed on rank {rank}: {message}") from error
        if error is not None:
            raise error
        return result

    def _gather(self, message: str | None) -> list[str | None]:
        """Every rank's error message for the last call (None: it succeeded), in rank order."""
        if self.layout.world_size == 1:
            return [message]
        failed = torch.tensor([message is not None], dtype=torch.int32, device=self.layout.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            return [None] * self.layout.world_size
        messages: list[str | None] = [None] * self.layout.world_size
        dist.all_gather_object(messages, message)
        return messages

    def call(self, name: str, *args: Any) -> Any:
        """Rank 0: run `handlers[name](*args)` on every rank; returns rank 0's result."""
        if not self.layout.is_rank_zero:
            raise RuntimeError("only rank 0 calls; the other ranks run follow()")
        if name not in self.handlers:
            raise KeyError(f"no handler {name!r}; registered: {sorted(self.handlers)}")
        if self.closed:
            raise RanksDiverged("lockstep is closed: the ranks no longer follow")
        self._announce((name, args))
        return self._run(name, args)

    def ping(self) -> None:
        if self.layout.world_size > 1 and not self.closed:
            self._announce((_PING, ()))

    def close(self) -> None:
        """Rank 0: release the followers (their `follow()` returns). Idempotent."""
        if not self.closed and self.layout.world_size > 1:
            self._announce((_CLOSE, ()))
        self.closed = True

    def follow(self) -> None:
        """Ranks other than 0: execute rank 0's calls until it closes; raises `RanksDiverged` when this rank
        (or another) failed a call that not every rank failed."""
        while True:
            name, args = self._announce(None)
            if name == _CLOSE:
                return
            if name == _PING:
                continue
            try:
                self._run(name, args)
            except RanksDiverged:
                raise
            except Exception as error:  # noqa: BLE001 - every rank failed alike: rank 0 reports it
                log.debug("rank %d: %s failed as on every rank: %s", self.layout.rank, name, error)
