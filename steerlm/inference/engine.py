"""The engine: one thread on rank 0 owns the model and every collective; clients hand it jobs.

HTTP handlers and the chat loop never touch the model. They submit jobs (a generation of n rows, or an
APM scoring) to a queue and receive events through the job's `sink`, a callable the engine calls from
its thread. Waiting generation jobs are batched: each decoding batch takes queued jobs in arrival order
while their rows fit `max_batch_size` (a job's n rows stay together), and runs them as one `stream`
call. Under tensor parallelism that call goes through `Lockstep`, so the other ranks decode the same
batch; an idle engine pings them so their collectives do not time out.

`serving()` is the start-up shared by chat and serve: checks, distributed runtime, model (and APM)
loading, then a running engine on rank 0, while the other ranks follow rank 0 until it closes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import torch

from steerlm import runtime
from steerlm.config.inference import InferenceConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.records import Conversation
from steerlm.inference.generate import Delta, SamplingParams
from steerlm.inference.loading import (
    LoadedModel,
    check_inference_layout,
    load_generator,
    read_checkpoint_setup,
    setup_tokenizer,
)
from steerlm.inference.lockstep import Lockstep
from steerlm.inference.scoring import AttributeScorer, open_apm_checkpoint
from steerlm.inference.steering import Steering

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The queue holds `max_queue` jobs already: try again later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class QueueTimeout(RuntimeError):
    """The job waited longer than `request_timeout_s` for the model (HTTP 503)."""


@dataclass(eq=False, kw_only=True)
class Job:
    """Events go to `sink`, called on the engine thread; it must not block. `cancel()` (a client that went
    away) makes the engine skip the job if it has not started and stop delivering to it."""

    sink: Callable[[object], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, event: object) -> None:
        if self.cancelled:
            return
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a client's broken sink must not stop the engine or the other jobs
            log.exception("dropping a job whose sink failed")
            self.cancelled = True


@dataclass(eq=False, kw_only=True)
class GenerationJob(Job):
    """n rows. Events: lists of deltas (`Delta.index` is the row within this job), then None when every
    row has finished, or an exception instead."""

    prompts: list[list[int]]
    params: list[SamplingParams]


@dataclass(eq=False, kw_only=True)
class ScoringJob(Job):
    """One event: the scorer's rows (raw score per attribute, and `reward` when merging) or an exception."""

    conversations: list[Conversation]


class Engine:
    """Rank 0's owner of the model: `submit` from any thread; one thread runs the jobs (`start`, `close`).

    Under TP that thread is the only one that makes collectives, so requests can never interleave them.
    """

    def __init__(
        self,
        lockstep: Lockstep,
        max_batch_size: int,
        max_queue: int,
        request_timeout_s: float | None,
        ping_interval_s: float,
    ) -> None:
        self.lockstep, self.max_batch_size, self.max_queue = lockstep, max_batch_size, max_queue
        self.request_timeout_s, self.ping_interval_s = request_timeout_s, ping_interval_s
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="steerlm-engine", daemon=True)
        self.batches = self.rows = 0

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._wake:
            if not self.healthy:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"{len(self._pending)} requests are waiting already (limits.max_queue); retry later")
            self._pending.append(job)
            self._wake.notify()

    def close(self) -> None:
        """Finish the queued jobs, release the other ranks and stop the thread (idempotent)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            with runtime.worker_thread(self.lockstep.layout):
                self._loop()
        except Exception:  # noqa: BLE001 - a bug must not leave clients waiting forever
            log.exception("the engine stopped")
            self._closing = True
            for job in self._pending:
                job.deliver(EngineClosed("the engine stopped after an internal error"))
        finally:
            self.lockstep.close()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                self.lockstep.ping()
            elif isinstance(batch[0], ScoringJob):
                self._score(batch[0])
            else:
                self._generate(cast(list[GenerationJob], batch))  # _next_batch runs a ScoringJob alone

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run together; [] after an idle ping interval; None once closing and drained."""
        with self._wake:
            self._wake.wait_for(lambda: self._pending or self._closing, timeout=self.ping_interval_s)
            batch: list[Job] = []
            rows = 0
            while self._pending:
                job = self._pending[0]
                if job.cancelled or self._expired(job):
                    self._pending.popleft()
                    continue
                if not isinstance(job, GenerationJob) or (batch and rows + len(job.prompts) > self.max_batch_size):
                    if not batch:
                        batch.append(self._pending.popleft())
                    break
                batch.append(self._pending.popleft())
                rows += len(job.prompts)
            return None if not batch and self._closing and not self._pending else batch

    def _expired(self, job: Job) -> bool:
        if self.request_timeout_s is None or time.monotonic() - job.submitted <= self.request_timeout_s:
            return False
        job.deliver(
            QueueTimeout(
                f"waited more than {self.request_timeout_s:g} s for the model "
                "(limits.request_timeout_s); the server is overloaded, retry later"
            )
        )
        return True

    def _score(self, job: ScoringJob) -> None:
        try:
            job.deliver(self.lockstep.call("score", job.conversations))
        except Exception as error:  # noqa: BLE001 - deterministic on every rank; the client gets the reason
            job.deliver(error)

    def _generate(self, jobs: list[GenerationJob]) -> None:
        owners = [(job, row) for job in jobs for row in range(len(job.prompts))]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        params = [setting for job in jobs for setting in job.params]
        self.batches, self.rows = self.batches + 1, self.rows + len(prompts)
        try:
            for deltas in self.lockstep.call("stream", prompts, params):
                per_job: dict[GenerationJob, list[Delta]] = defaultdict(list)
                for delta in deltas:
                    job, row = owners[delta.index]
                    per_job[job].append(replace(delta, index=row))
                for job, job_deltas in per_job.items():
                    job.deliver(job_deltas)
        except Exception as error:  # noqa: BLE001 - raised alike on every rank (bad input, model failure)
            log.warning("a batch of %d rows failed: %s", len(prompts), error)
            for job in jobs:
                job.deliver(error)
            return
        for job in jobs:
            job.deliver(None)


@dataclass(frozen=True)
class Service:
    """What rank 0 serves with: the running engine, the prompt builder, the model, the APM's schema."""

    engine: Engine
    steering: Steering
    model: LoadedModel
    scorer_schema: AttributeSchema | None


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    max_queue: int
    request_timeout_s: float | None


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Followers leave stopping to rank 0: SIGINT/SIGTERM (Ctrl-C, torchrun, Slurm) reach every rank, and a
    follower that died first would strand rank 0's in-flight requests in a collective."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def serving(cfg: InferenceConfig, batching: Batching, apm_checkpoint: str | None = None) -> Iterator[Service | None]:
    """Load the model (and the APM) at `cfg.parallel`; yield a running Service on rank 0, None elsewhere.

    Everything a config can get wrong (checkpoints, layout, default attributes) is checked before the
    distributed runtime starts. The other ranks follow rank 0's calls and only then see None; leaving the
    context on rank 0 finishes queued work and releases them.
    """
    cfg.validate()
    setup = read_checkpoint_setup(cfg.checkpoint, tokenizer_path=cfg.tokenizer_path)
    tokenizer = setup_tokenizer(setup)
    steering = Steering(
        setup.template, tokenizer, cfg.attributes, cfg.system_prompt, setup.model.max_position_embeddings - 1
    )
    apm = open_apm_checkpoint(apm_checkpoint) if apm_checkpoint is not None else None
    check_inference_layout(cfg.parallel, [setup.model] + ([apm.config.model] if apm else []))
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        loaded = load_generator(cfg.checkpoint, layout, cfg.precision, cfg.tokenizer_path, cfg.seed)
        handlers: dict[str, Callable] = {"stream": loaded.generator.stream}
        if apm is not None:
            handlers["score"] = AttributeScorer.from_checkpoint(apm, layout, seed=cfg.seed).score
        lockstep = Lockstep(layout, handlers)
        if not layout.is_rank_zero:
            with _signals_ignored():
                lockstep.follow()
            yield None
            return
        engine = Engine(
            lockstep, batching.max_batch_size, batching.max_queue, batching.request_timeout_s, cfg.ping_interval_s
        ).start()
        try:
            yield Service(engine, steering, loaded, apm.schema if apm else None)
        finally:
            engine.close()
    finally:
        runtime.shutdown()


def model_name(cfg_name: str | None, checkpoint: str) -> str:
    """The `model` clients send: the configured name, else the checkpoint's run directory name."""
    path = Path(checkpoint).resolve()
    return cfg_name or (path.parent.parent.name if path.parent.name == "checkpoints" else path.name)
