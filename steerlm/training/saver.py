"""The training loop's checkpoints: written while the loop waits, or (`checkpoint.async_save`) by a forked process
while the next steps train.

An asynchronous save blocks the loop only while its state is planned, its common part written and the process
forked (on a GPU: while the tensors are copied to host memory); each step then asks, in one collective, whether
every rank's writer has ended, and the first step after that publishes the checkpoint (index, config, metadata,
checksums — the big files' checksums were computed by the writers — and the rename into place). One save is in
flight at a time: a save due while the previous one is still being written waits for it. The last step's save,
and the one a stop signal or the time limit asks for, are written before the loop returns: the job is about to
end. A run that fails while a save is being written kills the writer; `latest` still names the previous
checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from steerlm.checkpoint.sharded import AsyncSave, TrainingState, save_checkpoint
from steerlm.config.schema import TrainConfig
from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)
SLOW_WAIT_SECONDS = 1.0  # a save due before the previous one is written: said in the log beyond this


class CheckpointSaver:
    """Every method but `abandon` is collective (call on every rank at the same step)."""

    def __init__(self, output_dir: Path, setup: TrainingState, layout: ParallelLayout, cfg: TrainConfig) -> None:
        self.output_dir, self.setup, self.layout, self.cfg = output_dir, setup, layout, cfg
        self.pending: AsyncSave | None = None

    def poll(self) -> None:
        """Publish the save in flight if every rank's writer has ended (no collective when none is in flight)."""
        if self.pending is not None and self.pending.published(blocking=False):
            self.pending = None

    def wait(self) -> None:
        """Block until the save in flight is published."""
        if self.pending is None:
            return
        started = time.perf_counter()
        self.pending.published(blocking=True)
        waited = time.perf_counter() - started
        if waited > SLOW_WAIT_SECONDS:
            log.info("waited %.1f s for step %d's checkpoint to be written", waited, self.pending.step)
        self.pending = None

    def save(self, step: int, final: bool) -> None:
        """Checkpoint `step`: asynchronously with `checkpoint.async_save` unless `final` (the run is ending)."""
        self.wait()
        started = time.perf_counter()
        if final or not self.cfg.checkpoint.async_save:
            save_checkpoint(self.output_dir, step, self.setup, self.layout, self.cfg)
            log.info("step %d's checkpoint: written in %.2f s", step, time.perf_counter() - started)
        else:
            self.pending = AsyncSave(self.output_dir, step, self.setup, self.layout, self.cfg)
            log.info(
                "step %d's checkpoint: started in %.2f s, written while training goes on",
                step,
                time.perf_counter() - started,
            )

    def abandon(self) -> None:
        """Local, when the run fails: kill the writer of the save in flight, which will never be published."""
        if self.pending is not None and self.pending.in_flight:
            log.warning(
                "the run failed while step %d's checkpoint was being written: abandoned (not published)",
                self.pending.step,
            )
            self.pending.abandon()
        self.pending = None
