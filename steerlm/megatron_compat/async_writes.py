"""Item 12 of `steerlm.megatron_compat` (its docstring says what each relies on): a checkpoint's shards written
by a forked process while training goes on (`AsyncShardWrite`).

megatron's asynchronous save (`dist_checkpointing.save(..., async_sharded_save=True)`) writes the common state
at once and returns an `AsyncRequest` for the shards: `preload_fn` stages the tensors in host memory (on CPU it
returns them as they are: the fork below is the snapshot, pages copied on write as training changes them),
`async_fn(rank, write_buckets, results_queue)` writes them (forking one writer per file bucket) and puts its
results (`{bucket index: [WriteResult]}` or an Exception) on `results_queue`, and `finalize_fns` gather those
results on every rank, write the `.metadata` index and `metadata.json`. `AsyncCallsQueue` (non-persistent) runs
`async_fn` in a process forked from the training process and tells, collectively, when every rank's has ended.

What steerlm changes: the forked process hands its results back through a file (`.writer_rank<r>.pkl` in the
checkpoint directory, removed before finalizing) instead of megatron's module-level `_results_queue`, which is a
`spawn` Manager queue (a new interpreter per process, item 3) or, once item 3 replaced it, an in-process queue a
forked process cannot reach. A file has no pipe buffer to fill (a pipe would block a writer whose results
exceed 64 KiB until its parent read them, and the parent reads only after the writer ended). The forked process
can also run a function of the files it wrote (`in_writer`: their checksums) while training goes on.
Relies on: the request's fields (`async_fn`, `async_fn_args`, `finalize_fns`), the shape of `async_fn_args`
(`[rank, write_buckets, results_queue]`, a bucket's first item its file path), `filesystem_async._results_queue`
being the queue the writer's finalization reads, and `AsyncCallsQueue.async_calls` (to kill a writer).
"""

from __future__ import annotations

import functools
import os
import pickle
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from steerlm.megatron_compat import use_in_process_save_queue  # defined before the package imports this module

WriterHook = Callable[[list[Path]], Any]


def _write_in_child(write: Callable, sidecar: Path, in_writer: WriterHook | None, rank: int, buckets: list, _) -> None:
    """The forked process: megatron's write with a queue of its own, then `in_writer(files)`, both reported
    through `sidecar` (written whole, then renamed into place)."""
    results: queue.Queue = queue.Queue()
    write(rank, buckets, results)
    written = results.get_nowait()
    extra = None
    if in_writer is not None and not isinstance(written, Exception):
        try:
            extra = in_writer(sorted({Path(bucket[0]) for bucket in buckets}))
        except Exception as error:  # reported to every rank by megatron's finalization, as a write failure
            written = error
    try:
        payload = pickle.dumps((written, extra))
    except Exception as error:  # an exception that does not pickle: its text still reaches the parent
        payload = pickle.dumps((RuntimeError(f"{written!r} (unpicklable: {error})"), None))
    part = sidecar.with_name(sidecar.name + ".part")
    part.write_bytes(payload)
    os.replace(part, sidecar)


class AsyncShardWrite:
    """One checkpoint's shards being written by a forked process. Construction is collective (every rank
    writes its common state and plans at once); `finished` is collective too. Fork inside
    `steerlm.checkpoint.writers.writers_die_with_parent` so the writers die with a killed trainer."""

    def __init__(self, state: dict, directory: Path, in_writer: WriterHook | None = None) -> None:
        self.directory = directory
        self.rank = dist.get_rank()
        self.sidecar = directory / f".writer_rank{self.rank}.pkl"
        self.in_writer_result: Any = None
        use_in_process_save_queue()
        self._results = filesystem_async._results_queue  # what this save's finalization reads
        request = dist_checkpointing.save(state, str(directory), async_sharded_save=True)
        self._writes = request.async_fn is not None  # a rank with no shard to write forks nothing
        if self._writes:
            request = request._replace(
                async_fn=functools.partial(_write_in_child, request.async_fn, self.sidecar, in_writer)
            )
        request = request._replace(finalize_fns=[self._deliver, *request.finalize_fns])
        self._calls = AsyncCallsQueue(persistent=False)
        self._calls.schedule_async_request(request)
        self._done = False

    def _deliver(self) -> None:
        """First finalization step on every rank: the forked process's results, for megatron's finalization."""
        if not self._writes:
            return
        if self.sidecar.exists():
            written, self.in_writer_result = pickle.loads(self.sidecar.read_bytes())
            self.sidecar.unlink()
        else:
            written = RuntimeError(f"rank {self.rank}'s checkpoint writer ended without reporting (was it killed?)")
        self._results.put(written)

    def finished(self, blocking: bool) -> bool:
        """Collective: whether every rank's writer ended and the checkpoint was finalized (waiting for that when
        `blocking`). Raises megatron's CheckpointException on every rank when a writer failed."""
        if not self._done:
            self._done = bool(self._calls.maybe_finalize_async_calls(blocking=blocking))
        return self._done

    def abandon(self) -> None:
        """Local: kill this rank's writer (the run failed while it wrote; nothing will publish its files)."""
        for call in self._calls.async_calls:
            call.async_caller.close(abort=True)
        self._calls.async_calls.clear()
        self._done = True
