"""The engine: one thread on rank 0 owns the model and every collective; clients hand it jobs.

HTTP handlers and the chat loop never touch the model. They submit jobs (a generation of n rows, or an
APM scoring) to a queue and receive events through the job's `sink`, a callable the engine calls from
its thread. Generation is continuous batching: at every step boundary waiting jobs join the running batch
in arrival order while their rows fit `max_batch_size` (a job's n rows join together, and none is
overtaken), and a job leaves it as soon as its rows finish, so its response or `[DONE]` goes out at once.
A job that was cancelled (its client went away) or outlived `request_timeout_s` leaves at the next step.
With `continuous=False` jobs join only an empty batch (batch-at-a-time, for comparison). Scoring jobs run
between steps. Under tensor parallelism each step is one `Lockstep` call (`advance`, with the rows that
join and leave), so the other ranks keep the same batch; an idle engine pings them so their collectives do
not time out.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from steerlm import runtime
from steerlm.config.inference import PREFILL_TOKENS, InferenceConfig
from steerlm.data.attribute_lines import trained_attribute_lines
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.records import Conversation
from steerlm.inference import metrics
from steerlm.inference.adapters import check_adapters, load_adapter_bank
from steerlm.inference.generate import Decoding, Delta, RowRequest, SamplingParams, StepOutcome
from steerlm.inference.loading import (
    LoadedModel,
    check_inference_layout,
    load_generator,
    read_checkpoint_setup,
    setup_tokenizer,
)
from steerlm.inference.lockstep import Lockstep, RanksDiverged
from steerlm.inference.metrics import EngineMetrics, Outcome
from steerlm.inference.scoring import AttributeScorer, open_apm_checkpoint
from steerlm.inference.steering import Steering

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The queue holds `max_queue` jobs already: try again later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class StepFailed(RuntimeError):
    """A decoding step failed on every rank; the batch was emptied and its requests fail (HTTP 500)."""


class RequestTimeout(RuntimeError):
    """The job did not finish within `request_timeout_s` of its arrival, queued or decoding (HTTP 503)."""


@dataclass(eq=False, kw_only=True)
class Job:
    """Events go to `sink`, called on the engine thread; it must not block. `cancel()` (a client that went
    away) makes the engine skip the job if it has not started, stop its rows at the next step and stop
    delivering to it. `request_id` names the request in the server's log."""

    sink: Callable[[object], None]
    request_id: str = "-"
    route: str = ""  # the API that made it (chat, completions, …) and the profile it was served as: metrics labels
    profile: str = ""
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    outcome: Outcome | None = field(default=None, init=False)  # how it left the engine, once it has

    @property
    def labels(self) -> tuple[str, str]:
        return self.route, self.profile

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, event: object) -> None:
        if self.cancelled:
            return
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a client's broken sink must not stop the engine or the other jobs
            log.exception("request %s: dropping a job whose sink failed", self.request_id)
            self.cancelled = True


@dataclass(eq=False, kw_only=True)
class GenerationJob(Job):
    """n rows. Events: lists of deltas (`Delta.index` is the row within this job), then None when every
    row has finished, or an exception instead."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    adapter: int = 0  # the LoRA adapter its rows use (`Service.adapters` of its profile; 0: the model alone)


@dataclass(eq=False, kw_only=True)
class ScoringJob(Job):
    """One event: the scorer's rows (raw score per attribute, and `reward` when merging) or an exception."""

    conversations: list[Conversation]


@dataclass(eq=False)
class _Running:
    """A generation job in the batch: its rows' keys (row i of the job is `keys[i]`), those not finished."""

    job: GenerationJob
    keys: list[int]
    open: set[int]
    generated: dict[int, int] = field(default_factory=dict)  # tokens each row has generated: metrics count the new


class Engine:
    """Rank 0's owner of the model: `submit` from any thread; one thread runs the jobs (`start`, `close`).

    Under TP that thread is the only one that makes collectives, so requests can never interleave them.
    If it stops on an error (the ranks fell out of step), every job gets the error, `failure` holds it and
    `on_failure` is called (the server stops).
    """

    def __init__(
        self,
        lockstep: Lockstep,
        max_batch_size: int,
        max_queue: int,
        request_timeout_s: float | None,
        ping_interval_s: float,
        continuous: bool = True,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.lockstep, self.max_batch_size, self.max_queue = lockstep, max_batch_size, max_queue
        self.request_timeout_s, self.ping_interval_s = request_timeout_s, ping_interval_s
        self.continuous, self.on_failure = continuous, on_failure
        self._pending: deque[Job] = deque()
        self._running: dict[int, _Running] = {}  # by row key, every row of each job
        self._next_key = 0
        self._wake = threading.Condition()
        self._closing = False
        self._deadline: float | None = None  # past it, unfinished jobs are failed (shutdown grace)
        self._thread = threading.Thread(target=self._run, name="steerlm-engine", daemon=True)
        self.requests = self.rows = self.steps = 0  # generation jobs and rows admitted; decoding steps
        self.failure: BaseException | None = None
        self.metrics = EngineMetrics()

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._wake:
            if not self.healthy:
                self.metrics.count(metrics.REJECTED, ("shutting_down",))
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.metrics.count(metrics.REJECTED, ("queue_full",))
                raise EngineBusy(f"{len(self._pending)} requests are waiting already (limits.max_queue); retry later")
            self._pending.append(job)
            self._wake.notify()

    def drain(self, grace_s: float | None = None) -> None:
        """Take no new jobs; finish the queued and running ones, within `grace_s` seconds if given (then
        they fail with EngineClosed)."""
        with self._wake:
            self._closing = True
            if grace_s is not None:
                self._deadline = time.monotonic() + grace_s
            self._wake.notify()

    def close(self) -> None:
        """Drain, release the other ranks and stop the thread (idempotent)."""
        self.drain()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            with runtime.worker_thread(self.lockstep.layout):
                self._loop()
        except Exception as error:  # noqa: BLE001 - a failure must not leave clients waiting forever
            log.exception("the engine stopped")
            self.failure = error
            with self._wake:
                self._closing = True
                jobs = list(self._pending) + [running.job for running in self._running.values()]
                self._pending.clear()
                self._running.clear()
            for job in dict.fromkeys(jobs):
                job.deliver(error)
            if self.on_failure is not None:
                self.on_failure(error)
        finally:
            self.lockstep.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                woke = bool(self._running) or self._wake.wait_for(
                    lambda: self._pending or self._closing, timeout=self.ping_interval_s
                )
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self._abandon()
                if self._closing and not self._pending and not self._running:
                    return
                scoring, joins = self._admit()
            for job in scoring:
                self._score(job)
            leaves = self._leaving()
            if joins or leaves or self._running:
                self._advance(joins, leaves)
            elif not woke:
                self.lockstep.ping()

    def _abandon(self) -> None:
        """Past the shutdown grace: every unfinished job fails (its rows leave at this step)."""
        closed = EngineClosed("the server shut down before this request finished (server.shutdown_timeout_s)")
        for job in dict.fromkeys([*self._pending, *(running.job for running in self._running.values())]):
            self._ended(job, Outcome.cancelled if job.cancelled else Outcome.failed)
            job.deliver(closed)
            job.cancel()
        self._pending.clear()

    def _ended(self, job: Job, outcome: Outcome) -> None:
        """Count a job leaving the engine, once (a job whose row failed leaves at the next step, cancelled), and a
        completed one's time from arrival."""
        if job.outcome is not None:
            return
        job.outcome = outcome
        self.metrics.count(metrics.ENDED, (*job.labels, outcome.value))
        if outcome == Outcome.completed:
            self.metrics.observe(metrics.LATENCY, job.labels, time.monotonic() - job.submitted)

    def _admit(self) -> tuple[list[ScoringJob], list[RowRequest]]:
        """Under the lock: scoring jobs at the head of the queue, and the rows of the generation jobs that
        join the batch now (in order, while they fit; batch-at-a-time: only into an empty batch)."""
        scoring: list[ScoringJob] = []
        joins: list[RowRequest] = []
        while self._pending:
            job = self._pending[0]
            if job.cancelled or self._expired(job):
                self._ended(job, Outcome.cancelled if job.cancelled else Outcome.timeout)
                self._pending.popleft()
            elif isinstance(job, ScoringJob):
                self._admitted(job)
                scoring.append(job)
                self._pending.popleft()
            elif isinstance(job, GenerationJob):
                joining = len(self._running) + len(job.prompts) <= self.max_batch_size
                if not joining or (not self.continuous and self._running and not joins):
                    break
                self._pending.popleft()
                keys = list(range(self._next_key, self._next_key + len(job.prompts)))
                self._next_key += len(keys)
                running = _Running(job, keys, set(keys))
                for key, prompt, params in zip(keys, job.prompts, job.params):
                    self._running[key] = running
                    joins.append(RowRequest(key, prompt, params, job.adapter))
                self.requests, self.rows = self.requests + 1, self.rows + len(keys)
                self._admitted(job)
                self.metrics.count(metrics.ROWS, job.labels, len(keys))
                self.metrics.count(metrics.PROMPT_TOKENS, job.labels, sum(len(prompt) for prompt in job.prompts))
        return scoring, joins

    def _admitted(self, job: Job) -> None:
        self.metrics.count(metrics.ADMITTED, job.labels)
        self.metrics.observe(metrics.QUEUE_WAIT, job.labels, time.monotonic() - job.submitted)

    def _expired(self, job: Job, now: float | None = None) -> bool:
        """True, with the job told so, once `request_timeout_s` has passed since it arrived."""
        now = time.monotonic() if now is None else now
        if self.request_timeout_s is None or now - job.submitted <= self.request_timeout_s:
            return False
        job.deliver(
            RequestTimeout(
                f"the request did not finish within {self.request_timeout_s:g} s (limits.request_timeout_s); "
                "the server is overloaded or the request too long"
            )
        )
        return True

    def _leaving(self) -> list[int]:
        """The open rows of running jobs that were cancelled or outlived their time; they leave the batch."""
        now, leaves = time.monotonic(), []
        for running in dict.fromkeys(self._running.values()):
            if not running.job.cancelled and self._expired(running.job, now):
                self._ended(running.job, Outcome.timeout)
                running.job.cancel()
            elif running.job.cancelled:
                self._ended(running.job, Outcome.cancelled)
            if running.job.cancelled:
                leaves += sorted(running.open)
                for key in running.keys:
                    self._running.pop(key, None)
        return leaves

    def _score(self, job: ScoringJob) -> None:
        try:
            scores = self.lockstep.call("score", job.conversations)
        except RanksDiverged:
            raise
        except Exception as error:  # noqa: BLE001 - deterministic on every rank; the client gets the reason
            self._ended(job, Outcome.failed)
            job.deliver(error)
            return
        self._ended(job, Outcome.completed)
        job.deliver(scores)

    def _advance(self, joins: list[RowRequest], leaves: list[int]) -> None:
        """One step of the batch on every rank; its deltas go to their jobs, finished jobs get None."""
        try:
            outcome: StepOutcome = self.lockstep.call("advance", joins, leaves)
        except RanksDiverged:
            raise
        except Exception as error:  # noqa: BLE001 - raised alike on every rank, whose batches are now empty
            jobs = list(dict.fromkeys(running.job for running in self._running.values()))
            log.error(
                "a decoding step failed; requests %s fail", ", ".join(job.request_id for job in jobs), exc_info=error
            )
            self._running.clear()
            for job in jobs:
                self._ended(job, Outcome.cancelled if job.cancelled else Outcome.failed)
                job.deliver(StepFailed(f"a decoding step failed: {type(error).__name__}"))
            return
        self.steps += outcome.stepped
        self.metrics.count(metrics.STEPS, (), outcome.stepped)
        for key, failure in outcome.failed:
            running = self._running.get(key)
            if running is not None and not running.job.cancelled:
                log.error("request %s: a row failed and leaves the batch: %s", running.job.request_id, failure)
                self._ended(running.job, Outcome.failed)
                running.job.deliver(failure)
                running.job.cancel()  # its other rows leave at the next step
        per_job: dict[_Running, list[Delta]] = defaultdict(list)
        for delta in outcome.deltas:
            running = self._running.get(delta.index)
            if running is None:  # a row of a job that failed this step
                continue
            self._count_delta(running, delta)
            per_job[running].append(replace(delta, index=running.keys.index(delta.index)))
            if delta.finish_reason is not None:
                running.open.discard(delta.index)
        for running, deltas in per_job.items():
            running.job.deliver(deltas)
            if not running.open:
                self._ended(running.job, Outcome.completed)
                running.job.deliver(None)
                for key in running.keys:
                    del self._running[key]

    def _count_delta(self, running: _Running, delta: Delta) -> None:
        """A row's new tokens, the job's first delta, and a row's finish reason, in the metrics."""
        job = running.job
        if not running.generated:
            self.metrics.observe(metrics.FIRST_TOKEN, job.labels, time.monotonic() - job.submitted)
        new = delta.tokens - running.generated.get(delta.index, 0)
        running.generated[delta.index] = delta.tokens
        self.metrics.count(metrics.GENERATED, job.labels, new)
        if delta.finish_reason is not None:
            self.metrics.count(metrics.FINISHED_ROWS, (*job.labels, delta.finish_reason.value))


@dataclass(frozen=True)
class Service:
    """What rank 0 serves with: the running engine, the prompt builder, the model, the APM's schema, and the
    checked attribute values of each configured profile."""

    engine: Engine
    steering: Steering
    model: LoadedModel
    scorer_schema: AttributeSchema | None
    presets: Mapping[str, Labels] = field(default_factory=dict)
    adapters: Mapping[str, int] = field(default_factory=dict)  # profile → its LoRA adapter's index in the bank


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    max_queue: int
    request_timeout_s: float | None
    continuous: bool = True  # False: batch-at-a-time (jobs join only an empty batch)
    prefill_tokens: int = PREFILL_TOKENS  # the most tokens one prefill forward computes (the generator's chunks)


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
def serving(
    cfg: InferenceConfig,
    batching: Batching,
    apm_checkpoint: str | None = None,
    profiles: Mapping[str, Mapping[str, float | None]] | None = None,
    adapters: Mapping[str, str] | None = None,
) -> Iterator[Service | None]:
    """Load the model (and the APM) at `cfg.parallel`; yield a running Service on rank 0, None elsewhere.
    `profiles`: each profile's attribute values, laid over the defaults (`Service.presets`); `adapters`: the LoRA
    adapter checkpoint of the profiles that have one (`steerlm.inference.adapters`).

    Everything a config can get wrong (checkpoints, layout, default and profile attributes) is checked
    before the distributed runtime starts. The other ranks follow rank 0's calls and only then see None; leaving the
    context on rank 0 finishes queued work and releases them.
    """
    cfg.validate()
    setup = read_checkpoint_setup(cfg.checkpoint, tokenizer_path=cfg.tokenizer_path)
    tokenizer = setup_tokenizer(setup)
    steering = Steering(
        setup.template,
        tokenizer,
        cfg.attributes,
        cfg.system_prompt,
        setup.model.max_position_embeddings - 1,
        trained_attribute_lines(setup.path),
    )
    presets = {
        name: steering.preset(values, steering.defaults, f"profiles.{name}.attributes")
        for name, values in (profiles or {}).items()
    }
    for who, labels in {
        "the default request": steering.defaults,
        **{f"profile {n}": v for n, v in presets.items()},
    }.items():
        if untrained := steering.untrained(labels):
            log.warning(
                "%s asks for %s, which none of the attribute lines the checkpoint trained on carries: its answers "
                "to it extrapolate (docs/evaluate_steering.md)",
                who,
                ", ".join(untrained),
            )
    adapter_paths = check_adapters(adapters or {}, setup.path, setup.model)
    apm = open_apm_checkpoint(apm_checkpoint) if apm_checkpoint is not None else None
    check_inference_layout(cfg.parallel, [setup.model] + ([apm.config.model] if apm else []))
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        loaded = load_generator(
            cfg.checkpoint, layout, cfg.precision, cfg.tokenizer_path, cfg.seed, verify=cfg.verify_checkpoint
        )
        loaded.generator.prefill_tokens = batching.prefill_tokens
        indices: dict[str, int] = {}
        if adapter_paths:
            bank, indices = load_adapter_bank(
                adapter_paths, [loaded.generator.model], layout, setup.model, cfg.verify_checkpoint
            )
            loaded.generator.use_adapters(bank)
        handlers: dict[str, Callable] = {"advance": Decoding(loaded.generator).advance}
        if apm is not None:
            scorer = AttributeScorer.from_checkpoint(apm, layout, seed=cfg.seed, verify=cfg.verify_checkpoint)
            handlers["score"] = scorer.score
        lockstep = Lockstep(layout, handlers)
        if not layout.is_rank_zero:
            with _signals_ignored():
                lockstep.follow()
            yield None
            return
        engine = Engine(
            lockstep,
            batching.max_batch_size,
            batching.max_queue,
            batching.request_timeout_s,
            cfg.ping_interval_s,
            batching.continuous,
        ).start()
        try:
            yield Service(engine, steering, loaded, apm.schema if apm else None, presets, indices)
        finally:
            engine.close()
    finally:
        runtime.shutdown()


def model_name(cfg_name: str | None, checkpoint: str) -> str:
    """The `model` clients send: the configured name, else the checkpoint's run directory name."""
    path = Path(checkpoint).resolve()
    return cfg_name or (path.parent.parent.name if path.parent.name == "checkpoints" else path.name)
