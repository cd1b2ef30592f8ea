"""The serving engine over a scripted decoding: requests join the running batch at step boundaries and leave
it when done (or batch-at-a-time when asked), cancelled and timed-out requests leave at the next step, a
failing row or step fails only its own requests, the shutdown grace is enforced; and the TP lockstep settles
every call between two ranks, a follower's own failure stopping both with the error logged on rank 0."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from steerlm.inference import Delta, FinishReason, SamplingParams
from steerlm.inference.engine import (
    Engine,
    EngineBusy,
    EngineClosed,
    GenerationJob,
    RequestTimeout,
    ScoringJob,
    StepFailed,
)
from steerlm.inference.generate import RowRequest, StepOutcome, TokenLogprob
from steerlm.inference.lockstep import Lockstep, RanksDiverged


class ScriptedDecoding:
    """Stands in for `Decoding.advance`: every live row emits `w1 `, `w2 `, … one word per step and finishes at
    its max_new_tokens, as token id k at step k (with `logprobs`: log-probability -k, and alternatives ids 1,
    2, … at -1, -inf, -inf, …; with `prompt_logprobs`, on its first delta, prompt token i + 1 at -(i + 1) / 8
    with the same alternatives; a row with max_new_tokens 0 finishes when it joins, its prompt scored so
    without alternatives); a row with seed 666 is refused when it joins. With `gated`, each step first
    waits for a permit (`permits.release()`), so a test decides when steps run. `log` holds per step the keys that
    joined, left and decoded."""

    def __init__(self, gated: bool = False) -> None:
        self.live: dict[int, list] = {}  # key → [words so far, max_new_tokens, params]
        self.log: list[dict[str, list[int]]] = []
        self.permits = threading.Semaphore(0) if gated else None
        self.stepped: queue.Queue[int] = queue.Queue()
        self.fail_step: int | None = None
        self.entered = threading.Condition()
        self.in_step = 0  # the step the engine has called (its joins and leaves are fixed)

    def wait_in(self, step: int) -> None:
        with self.entered:
            assert self.entered.wait_for(lambda: self.in_step >= step, timeout=30)

    def advance(self, joins: list[RowRequest], leaves: list[int]) -> StepOutcome:
        with self.entered:
            self.in_step += 1
            self.entered.notify_all()
        if self.permits is not None:
            assert self.permits.acquire(timeout=30), "the test released no permit"
        try:
            return self._advance(joins, leaves)
        finally:
            self.stepped.put(len(self.log))

    def _advance(self, joins: list[RowRequest], leaves: list[int]) -> StepOutcome:
        outcome = StepOutcome()
        for key in leaves:
            self.live.pop(key, None)
        for row in joins:
            if row.params.seed == 666:
                outcome.failed.append((row.key, ValueError("seed 666 is refused")))
            elif row.params.max_new_tokens == 0:  # the prompt only: finished at once
                scored = tuple(TokenLogprob(t, -(i + 1) / 8) for i, t in enumerate(row.prompt[1:]))
                outcome.deltas.append(Delta(row.key, "", FinishReason.length, prompt_logprobs=scored))
            else:
                self.live[row.key] = [0, row.params.max_new_tokens, row.params, list(row.prompt)]
        self.log.append({"joined": [r.key for r in joins], "left": list(leaves), "decoded": sorted(self.live)})
        if self.fail_step == len(self.log):
            self.live.clear()
            raise RuntimeError("the model broke")
        for key, row in list(self.live.items()):
            row[0] += 1
            finish = FinishReason.length if row[0] >= row[1] else None
            params, step = row[2], row[0]
            alternatives = tuple((i, -1.0 if i == 1 else -math.inf) for i in range(1, params.top_logprobs + 1))
            logprobs = (TokenLogprob(step, -float(step), alternatives),) if params.logprobs else ()
            scored = None
            if params.prompt_logprobs and step == 1:
                scored = tuple(TokenLogprob(t, -(i + 1) / 8, alternatives) for i, t in enumerate(row[3][1:]))
            delta = Delta(key, f"w{step} ", finish, step, logprobs, token_ids=(step,), prompt_logprobs=scored)
            outcome.deltas.append(delta)
            if finish is not None:
                del self.live[key]
        outcome.stepped = bool(self.log[-1]["decoded"])
        return outcome

    def steps_of(self, key: int) -> list[int]:
        """The steps (1-based) that decoded row `key`."""
        return [step for step, entry in enumerate(self.log, 1) if key in entry["decoded"]]


class ScriptedLockstep:
    layout = SimpleNamespace(device=torch.device("cpu"))

    def __init__(self, decoding: ScriptedDecoding) -> None:
        self.decoding, self.closed = decoding, False
        self.pinged = threading.Event()
        self.calls: list[str] = []
        self.error: Exception | None = None

    def call(self, name: str, *args):
        self.calls.append(name)
        if self.error is not None:
            raise self.error
        if name == "score":
            return [{"quality": 1.0} for _ in args[0]]
        return self.decoding.advance(*args)

    def ping(self) -> None:
        self.pinged.set()

    def close(self) -> None:
        self.closed = True


def _engine(gated: bool = False, **kwargs) -> tuple[Engine, ScriptedDecoding, ScriptedLockstep]:
    decoding = ScriptedDecoding(gated)
    lockstep = ScriptedLockstep(decoding)
    options = {"max_batch_size": 4, "max_queue": 8, "request_timeout_s": None, "ping_interval_s": 30} | kwargs
    return Engine(lockstep, **options).start(), decoding, lockstep  # type: ignore[arg-type]


def _job(rows: int, events: queue.Queue, tokens: int = 3, seed: int = 0, **kwargs) -> GenerationJob:
    params = [SamplingParams(max_new_tokens=tokens, seed=seed)] * rows
    return GenerationJob(sink=events.put, prompts=[[1, 2]] * rows, params=params, **kwargs)


def _events(events: queue.Queue) -> list:
    """A job's events up to its end (None, or an exception, which is included)."""
    out = []
    while (event := events.get(timeout=30)) is not None and not isinstance(event, Exception):
        out.extend(event)
    return out + ([event] if event is not None else [])


def _step(decoding: ScriptedDecoding, steps: int = 1) -> None:
    for _ in range(steps):
        decoding.permits.release()  # type: ignore[union-attr]
        decoding.stepped.get(timeout=30)


def _finish(engine: Engine, decoding: ScriptedDecoding) -> None:
    """Let the engine run every step it still has, and close it."""
    decoding.permits.release(100)  # type: ignore[union-attr]
    engine.close()


def test_requests_join_the_running_batch_at_step_boundaries_and_leave_when_done() -> None:
    engine, decoding, _ = _engine(gated=True)
    long, short, wide, blocked, small = (queue.Queue() for _ in range(5))
    engine.submit(_job(1, long, tokens=8))  # key 0
    _step(decoding, 2)
    engine.submit(_job(1, short, tokens=2))  # key 1: joins the running batch
    _step(decoding, 3)
    assert [d.text for d in _events(short)] == ["w1 ", "w2 "]  # finished while the long row decodes
    assert decoding.live.keys() == {0} and not long.empty()
    engine.submit(_job(3, wide, tokens=2))  # keys 2-4: 1 + 3 rows fit max_batch_size 4
    engine.submit(_job(2, blocked, tokens=1))  # keys 5-6: do not fit until the wide job leaves
    engine.submit(_job(1, small, tokens=1))  # key 7 would fit, but never overtakes the job before it
    _finish(engine, decoding)
    joined = {key: step for step, entry in enumerate(decoding.log, 1) for key in entry["joined"]}
    assert decoding.steps_of(1) == [joined[1], joined[1] + 1] and joined[1] > 1  # joined mid-batch, left at once
    assert decoding.steps_of(0) == list(range(1, 9))  # the long row never waited
    assert joined[5] == joined[6] > max(decoding.steps_of(4)) and joined[7] >= joined[5]
    assert [d.index for d in _events(wide)] == [0, 1, 2, 0, 1, 2]  # the job's own rows, whatever their keys
    assert _events(small) == [Delta(0, "w1 ", FinishReason.length, 1, token_ids=(1,))]
    assert (engine.requests, engine.rows, engine.steps) == (5, 8, sum(bool(e["decoded"]) for e in decoding.log))


def test_batch_at_a_time_admits_requests_only_into_an_empty_batch() -> None:
    engine, decoding, _ = _engine(gated=True, continuous=False)
    long, short = queue.Queue(), queue.Queue()
    engine.submit(_job(1, long, tokens=4))
    _step(decoding)
    engine.submit(_job(1, short, tokens=1))
    _finish(engine, decoding)
    assert decoding.steps_of(0) == [1, 2, 3, 4] and decoding.steps_of(1) == [5]  # waited for the whole batch
    assert len(_events(short)) == 1 and len(_events(long)) == 4


def test_cancelled_and_timed_out_requests_leave_the_batch_at_the_next_step() -> None:
    engine, decoding, _ = _engine(gated=True, request_timeout_s=60)
    kept, cancelled, late = queue.Queue(), queue.Queue(), queue.Queue()
    jobs = [_job(1, kept, tokens=5), _job(2, cancelled, tokens=50), _job(1, late, tokens=50)]
    for job in jobs:
        engine.submit(job)
    _step(decoding, 2)
    decoding.wait_in(3)  # step 3 is under way
    jobs[1].cancel()  # the client went away
    jobs[2].submitted -= 120  # it has outlived limits.request_timeout_s while decoding
    _finish(engine, decoding)
    assert decoding.log[3]["left"] == [1, 2, 3]  # both leave at the next step
    assert decoding.steps_of(1) == decoding.steps_of(3) == [1, 2, 3]
    assert isinstance(_events(late)[-1], RequestTimeout) and len(_events(kept)) == 5


def test_a_full_queue_is_refused_and_queued_requests_expire_or_are_skipped_when_cancelled() -> None:
    engine, decoding, lockstep = _engine(gated=True, max_batch_size=1, max_queue=4, request_timeout_s=5)
    events = [queue.Queue() for _ in range(4)]
    engine.submit(_job(1, events[0]))
    _step(decoding)
    decoding.wait_in(2)  # the queue is not read again before step 2 ends
    engine.submit(_job(1, events[1], submitted=time.monotonic() - 10))  # waited past request_timeout_s
    cancelled = _job(1, queue.Queue())
    engine.submit(cancelled)
    cancelled.cancel()
    engine.submit(_job(1, events[2]))
    engine.submit(ScoringJob(sink=events[3].put, conversations=["a conversation"]))
    with pytest.raises(EngineBusy, match="limits.max_queue"):
        engine.submit(_job(1, queue.Queue()))
    _finish(engine, decoding)
    assert isinstance(events[1].get(), RequestTimeout) and len(_events(events[2])) == 3
    assert [entry["joined"] for entry in decoding.log if entry["joined"]] == [[0], [1]]  # the cancelled never ran
    assert events[3].get() == [{"quality": 1.0}] and lockstep.closed and not engine.healthy
    with pytest.raises(EngineClosed):
        engine.submit(_job(1, events[3]))


def test_a_failing_row_or_step_fails_only_its_own_requests() -> None:
    engine, decoding, _ = _engine(gated=True)
    good, refused, broken = queue.Queue(), queue.Queue(), queue.Queue()
    engine.submit(_job(1, good, tokens=2))
    engine.submit(_job(2, refused, seed=666))  # refused when it joins; its sibling row leaves
    _step(decoding, 2)
    assert isinstance(_events(refused)[-1], ValueError) and len(_events(good)) == 2
    decoding.fail_step = 3
    engine.submit(_job(1, broken, tokens=5))
    _step(decoding)
    engine.submit(_job(1, good, tokens=1))  # the engine goes on after a failed step
    _finish(engine, decoding)
    assert isinstance(_events(broken)[-1], StepFailed) and len(_events(good)) == 1


def test_past_the_shutdown_grace_unfinished_requests_fail_with_engine_closed() -> None:
    engine, decoding, lockstep = _engine(gated=True, max_batch_size=1)
    running, waiting = queue.Queue(), queue.Queue()
    engine.submit(_job(1, running, tokens=50))
    engine.submit(_job(1, waiting))
    _step(decoding)
    decoding.wait_in(2)
    engine.drain(grace_s=0)
    _step(decoding, 2)  # step 2 decodes; past the grace, both jobs fail and the running row leaves at step 3
    engine.close()
    assert isinstance(_events(running)[-1], EngineClosed) and isinstance(_events(waiting)[-1], EngineClosed)
    assert decoding.log[-1]["left"] == [0] and lockstep.closed


def test_ranks_falling_out_of_step_stop_the_engine_and_fail_every_request() -> None:
    engine, _, lockstep = _engine(gated=True)
    stopped = threading.Event()
    engine.on_failure = lambda error: stopped.set()
    lockstep.error = RanksDiverged("advance failed on rank 1: out of memory")
    events = queue.Queue()
    engine.submit(_job(1, events))
    assert stopped.wait(30) and isinstance(events.get(timeout=30), RanksDiverged)
    assert isinstance(engine.failure, RanksDiverged) and not engine.healthy and lockstep.closed
    with pytest.raises(EngineClosed):
        engine.submit(_job(1, events))


def test_an_idle_engine_pings_the_other_ranks() -> None:
    engine, _, lockstep = _engine(ping_interval_s=0.01)
    assert lockstep.pinged.wait(30)
    engine.close()
    assert lockstep.closed


# --- the TP lockstep, two ranks as threads ----------------------------------------------------------------


class ThreadedWorld:
    """The three collectives Lockstep makes, between ranks that are threads of this process (each thread sets
    `rank.value`); a real two-process gloo world runs them in tests/test_server.py's TP=2 server test."""

    ReduceOp = SimpleNamespace(MAX="max")

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size
        self.rank = threading.local()

    def _exchange(self, value):
        self.slots[self.rank.value] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values

    def broadcast_object_list(self, holder: list, src: int = 0) -> None:
        holder[0] = self._exchange(holder[0])[src]

    def all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        assert op == "max"
        tensor.copy_(torch.stack(self._exchange(tensor.clone())).amax(0))

    def all_gather_object(self, out: list, value) -> None:
        out[:] = self._exchange(value)


def test_a_followers_own_failure_stops_both_ranks_with_the_error_logged_on_rank_zero(monkeypatch, caplog) -> None:
    """An error raised alike on both ranks is rank 0's to report and both go on; an error on rank 1 alone makes
    both raise RanksDiverged (rank 0's call, rank 1's follow), logged at ERROR on rank 0 with rank 1's message,
    and rank 0's close does not wait for the follower that left."""
    import steerlm.inference.lockstep as lockstep_module

    world = ThreadedWorld(2)
    monkeypatch.setattr(lockstep_module, "dist", world)
    out: dict[int, dict] = {0: {}, 1: {}}

    def rank(number: int) -> None:
        world.rank.value = number
        layout = SimpleNamespace(dp=1, pp=1, world_size=2, rank=number, is_rank_zero=number == 0, device="cpu")

        def everywhere() -> None:
            raise ValueError("prompt 0 is empty")

        def on_rank_one() -> str:
            if number == 1:
                raise RuntimeError("CUDA out of memory on rank 1")
            return "done"

        lockstep = Lockstep(layout, {"echo": lambda x: (number, x), "bad": everywhere, "flaky": on_rank_one})
        try:
            if number == 0:
                out[0]["echo"] = lockstep.call("echo", 5)
                with pytest.raises(ValueError, match="prompt 0 is empty"):
                    lockstep.call("bad")
                out[0]["after"] = lockstep.call("echo", 6)
                lockstep.call("flaky")
            else:
                lockstep.follow()
        except RanksDiverged as error:
            out[number]["error"] = str(error)
            lockstep.close()

    threads = [threading.Thread(target=rank, args=(n,), name=f"rank{n}") for n in (0, 1)]
    with caplog.at_level(logging.DEBUG, logger="steerlm.inference.lockstep"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert out[0]["echo"] == (0, 5) and out[0]["after"] == (0, 6)
    assert out[0]["error"] == out[1]["error"] == "flaky failed on rank 1: RuntimeError: CUDA out of memory on rank 1"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.threadName == "rank0"]
    assert len(errors) == 1 and "rank 1" in errors[0].getMessage() and "CUDA out of memory" in errors[0].getMessage()
