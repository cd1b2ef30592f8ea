"""The whole SteerLM pipeline on the synthetic world, one command: `recipes/pipeline.py` (what `make demo` runs).

Every stage runs as its own recipe in a subprocess — exactly the command a user would type, under torchrun
when `pipeline.parallel` needs more than one process — with its log in `<output_dir>/logs/<stage>.log`:

    world            prepare_data data=synthetic         data/ (ratings, conversations, corpus, tokenizer)
    pretrain         pretrain                            base/   the base LM that knows the world
    apm              train_attribute_model               apm/    initialised from base/
    judge            train_sft on the rated data         judge/  only with pipeline.judge (the Bayes judge)
    annotate         annotate                            data/apm_labels.jsonl
    sft, sft_plain   train_sft (with/without attributes) sft/, sft_plain/   initialised from base/ (stage 3 from
                                                         judge/ with pipeline.sft_init=judge)
    bootstrap        bootstrap                           bootstrap/   from sft/, labelled by apm/
    steer_*          evaluate_steering                   eval/steering_{sft,bootstrap,plain}.json
    report           (in this process)                   report.md, report.json, figures/*.png

A stage whose result is complete is skipped, so rerunning after a kill resumes: the interrupted stage continues
from its own checkpoints or part files. `.pipeline/<stage>.json` records the command each stage was started
with; a rerun whose command differs is refused (its outputs would mix two settings).

The stages run in waves (`Step.wave`): the stages of one wave need nothing from each other — SFT and the plain
SFT; the three steering evaluations — and run at the same time (`pipeline.concurrent`), sharing
`pipeline.threads` CPU threads: each starts with threads // stages of its wave (at least 1), and when a stage
ends the ones still running split the threads again — a training stage takes its raised share between two steps
(`steerlm.runtime.threads`), so the knowledge route's judge gets the core the APM leaves after ~3 of its ~18
minutes. Two processes of one thread each get more done than one process of two threads: the single-threaded
parts of a stage (start-up, tokenizing, writing) overlap; so annotation, whose labels do not depend on how many
data-parallel ranks write them, runs its share as that many one-thread replicas under torchrun (`Step.replicable`).
How many threads a stage has does not change its numbers — MKL's products run in strict reproducibility mode
(`parallel.cpu_reproducible`, steerlm/runtime/mkl.py), oneDNN's never depended on it — which `tests/test_pipeline.py`
checks by training at 1 and 2 threads, and switching from 1 to 2 mid-run, and comparing the weights bitwise.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from itertools import groupby
from pathlib import Path
from typing import IO, cast

import torch
from omegaconf import DictConfig, OmegaConf

from steerlm.config import ConfigError, ParallelConfig, to_typed
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.store import CONF_DIR, RECIPES_DIR
from steerlm.files import atomic_write_text
from steerlm.runtime.lifetime import die_with_parent
from steerlm.runtime.threads import THREADS_FILE, write_share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    recipe: str
    args: tuple[str, ...]
    result: Path  # exists (and says it finished) once the stage is complete
    processes: int = 1
    wave: int = 0  # stages of one wave run at the same time; waves run in order
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads (with keep_going, a failed one skips it)
    # Whether its outputs are the same at any data-parallel size (annotate: each rank labels whole shards, as
    # one process would), so on a CPU it runs its thread share as that many one-thread replicas (`replicas`)
    replicable: bool = False

    def command(self, replicas: int = 1) -> list[str]:
        """The stage's command line, under torchrun with `processes` x `replicas` processes when that is more
        than one."""
        script = str(RECIPES_DIR / f"{self.recipe}.py")
        if self.processes * replicas == 1:
            return [sys.executable, script, *self.args]
        # --standalone: torchrun picks a free rendezvous port, so two pipelines on one machine never collide
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(self.processes * replicas),
        ]
        return [*launcher, script, *self.args]

    def replicas(self, threads: int, cuda: bool) -> int:
        """Data-parallel replicas for a share of `threads`: a replicable stage on CPUs runs one single-threaded
        replica per thread — annotation's rows/s at 2 threads rose 1.25x that way, with byte-identical labels
        (docs/pipeline.md, "Waves") — and every other stage, or any stage on GPUs (one per device), one."""
        return threads if self.replicable and not cuda and threads > 1 else 1


@dataclass(frozen=True)
class Paths:
    """Where each stage writes, under the pipeline's output_dir."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def apm(self) -> Path:
        return self.root / "apm"

    @property
    def judge(self) -> Path:
        return self.root / "judge"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def sft_plain(self) -> Path:
        return self.root / "sft_plain"

    @property
    def bootstrap(self) -> Path:
        return self.root / "bootstrap"

    @property
    def bootstrapped(self) -> Path:
        """The last bootstrap iteration's model (a link the bootstrap stage writes when it completes)."""
        return self.bootstrap / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def finished(result: Path) -> bool:
    """A stage's result file exists and, where it says so, the stage was not stopped early."""
    if not result.is_file():
        return False
    if result.suffix != ".json":
        return True
    try:
        payload = json.loads(result.read_text())
    except json.JSONDecodeError:
        return False
    return not (isinstance(payload, dict) and payload.get("stop_reason"))


def layout_processes(option: str) -> int:
    """Processes a conf/parallel option needs with one data-parallel replica (tensor x pipeline x context)."""
    path = CONF_DIR / "parallel" / f"{option}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError("pipeline.parallel", option, "is not an option of conf/parallel", f"use one of {options}")
    # merged into a structured (dataclass) config, the result is a DictConfig
    node = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(ParallelConfig), OmegaConf.load(path)))
    return to_typed(node, ParallelConfig).model_parallel_size


# World settings added after runs existed, with the value those runs' data has: passed to the world stage only when
# set to another, so a run directory from before resumes (its recorded command has no such argument).
_PASSED_WHEN_SET = {"knowledge_errors": "random"}


def plan(cfg: PipelineConfig) -> list[Step]:
    """The stages' commands, in order, with absolute paths chaining them."""
    out = Paths(Path(cfg.output_dir).resolve())
    data = out.data
    layout = cfg.pipeline.parallel
    processes = layout_processes(layout)
    common = [f"tokenizer.path={data / 'tokenizer'}", f"parallel={layout}"]
    world = [
        f"synthetic.{f.name}={getattr(cfg.synthetic, f.name)}"
        for f in fields(cfg.synthetic)
        if f.name not in _PASSED_WHEN_SET or getattr(cfg.synthetic, f.name) != _PASSED_WHEN_SET[f.name]
    ]

    def sft_args(init: Path) -> list[str]:
        return [
            *common,
            f"sft.init_from={init}",
            f"data.train_file={data / 'apm_labels.jsonl'}",
            "data.format=conversation",
            # Stage 3 is bound by its number of updates, not its examples: 1,200 steps of 8 conversations steer the
            # surface attributes far better than the recipe's 400 of 32, in the same time
            # (docs/pipeline_measurements.md, "Training budgets"). Plain SFT gets the same budget.
            "trainer.micro_batch_size=8",
            "trainer.global_batch_size=8",
            "trainer.max_steps=1200",
            # validation at the start and the end only: each pass over the 1,947 held-out conversations takes ~10 s
            # at one thread on the critical path, and the weights do not depend on it
            "trainer.eval_interval=null",
        ]

    judge, judged = _judge_steps(cfg, out, common, processes)
    steer = [f"prompts={data / 'eval_prompts.jsonl'}", f"world={data / 'world.json'}", f"parallel={layout}"]
    trained = ("world", "pretrain", "annotate")  # the SFT stages: the base LM, the annotated conversations
    # pipeline.sft_init=judge: stage 3 starts from the judge, which already writes text for every attribute line of
    # the rated data, so it only has to learn the annotated conversations: 2,400 updates from it steer helpfulness
    # better than 9,600 from the base LM (docs/pipeline_measurements.md, "Stage 3 from the judge"). Plain SFT keeps
    # the base LM.
    from_judge = cfg.pipeline.sft_init == "judge"
    steps = [
        Step("world", "prepare_data", ("data=synthetic", f"output={data}", *world), data / "summary.json", 1, 0),
        Step(
            "pretrain",
            "pretrain",
            (*common, f"output_dir={out.base}", f"data.train_file={data / 'corpus.jsonl'}"),
            out.base / "summary.json",
            processes,
            1,
            ("world",),
        ),
        Step(
            "apm",
            "train_attribute_model",
            (
                *common,
                f"output_dir={out.apm}",
                f"apm.init_from={out.base}",
                f"data.train_file={data / 'annotated.jsonl'}",
                # From the base LM it overfits its 1,800 ratings after ~400 steps: validation loss at 400 / 600 steps
                # 0.577 / 0.646, 0.615 / 0.691, 0.599 / 0.673 on world seeds 0, 1, 2 (docs/pipeline_measurements.md).
                "trainer.max_steps=400",
            ),
            out.apm / "eval.json",
            processes,
            2,
            ("world", "pretrain"),
        ),
        *judge,
        Step(
            "annotate",
            "annotate",
            (
                f"apm_checkpoint={out.apm}",
                f"input={data / 'unlabelled.jsonl'}",
                f"output={data / 'apm_labels.jsonl'}",
                f"parallel={layout}",
                *judged,
            ),
            data / "apm_labels.jsonl.summary.json",
            processes,
            3,
            ("world", "apm", *(step.name for step in judge)),
            replicable=True,
        ),
        Step(
            "sft",
            "train_sft",
            (*sft_args(out.judge if from_judge else out.base), f"output_dir={out.sft}"),
            out.sft / "eval.json",
            processes,
            4,
            (*trained, *(("judge",) if from_judge else ())),
        ),
        Step(
            "sft_plain",
            "train_sft",
            (*sft_args(out.base), f"output_dir={out.sft_plain}", "sft.condition_on_attributes=false"),
            out.sft_plain / "eval.json",
            processes,
            4,
            trained,
        ),
        Step(
            "bootstrap",
            "bootstrap",
            (
                *common,
                f"output_dir={out.bootstrap}",
                f"sft.init_from={out.sft}",
                f"bootstrap.apm_checkpoint={out.apm}",
                f"data.train_file={data / 'apm_labels.jsonl'}",
                *(f"bootstrap.{arg}" for arg in judged),
            ),
            out.bootstrap / "eval.json",
            processes,
            5,
            ("world", "apm", "annotate", "sft", *(step.name for step in judge)),
        ),
        Step(
            "steer_sft",
            "evaluate_steering",
            (*steer, f"checkpoint={out.sft}", f"output={out.eval / 'steering_sft.json'}"),
            out.eval / "steering_sft.json",
            processes,
            6,
            ("world", "sft"),
        ),
        Step(
            "steer_bootstrap",
            "evaluate_steering",
            (*steer, f"checkpoint={out.bootstrapped}", f"output={out.eval / 'steering_bootstrap.json'}"),
            out.eval / "steering_bootstrap.json",
            processes,
            6,
            ("world", "bootstrap"),
        ),
        Step(
            "steer_plain",
            "evaluate_steering",
            (*steer, f"checkpoint={out.sft_plain}", "only_base=true", f"output={out.eval / 'steering_plain.json'}"),
            out.eval / "steering_plain.json",
            processes,
            6,
            ("world", "sft_plain"),
        ),
    ]
    return [replace(s, args=(*s.args, *cfg.stages.get(s.name, []))) for s in steps]


def _judge_steps(cfg: PipelineConfig, out: Paths, common: list[str], processes: int) -> tuple[list[Step], list[str]]:
    """With `pipeline.judge`: the judge stage — stage 3's recipe on the human-rated data, beside the APM — and
    the `judge.*` arguments with which annotate (and, under `bootstrap.`, the bootstrap's labelling) use it and
    the refit, learned from the same ratings. Without: nothing, so the commands, and a run directory made before
    the judge existed, stay as they were."""
    options = cfg.pipeline
    if not options.judge:
        return [], []
    rated = out.data / "annotated.jsonl"
    train = (
        *common,
        f"output_dir={out.judge}",
        f"sft.init_from={out.base}",
        f"data.train_file={rated}",
        "data.format=helpsteer2",
        # 9,600 updates of 8: the judge learns an attribute one sentence position at a time, so its held-out
        # Pearson keeps rising: on world seed 2 correctness 0.801 → 0.964 and helpfulness 0.583 → 0.885 from
        # 4,800 to 9,600 (docs/pipeline_measurements.md, "The judge's training budget")
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        "trainer.max_steps=9600",
        "trainer.eval_interval=null",
    )
    step = Step("judge", "train_sft", train, out.judge / "eval.json", processes, 2, ("world", "pretrain"))
    args = [f"judge.checkpoint={out.judge}", f"judge.attributes=[{','.join(options.judge)}]"]
    if options.judge_refit:
        args += [f"judge.refit=[{','.join(options.judge_refit)}]", f"judge.refit_data={rated}"]
    return [step], args


@dataclass
class _Running:
    step: Step
    process: subprocess.Popen
    log: IO[str]
    log_path: Path
    began: float
    threads_file: Path  # where the stage reads its share (steerlm.runtime.threads), per process
    shares: list[int]  # the shares it was given, the last its current one (all its replicas' threads together)
    replicas: int = 1  # `Step.replicas`: the share is split evenly over them


def _start(step: Step, out: Paths, threads: int) -> _Running | None:
    """Start one stage with `threads` CPU threads (as that many one-thread replicas where `Step.replicas` says),
    or None when it is complete. ConfigError naming the stage when its recorded command differs; the replicas are
    not part of it, since they do not change the stage's outputs."""
    marker = out.root / ".pipeline" / f"{step.name}.json"
    replicas = step.replicas(threads, torch.cuda.is_available())
    command = step.command(replicas)
    recorded = {"recipe": step.recipe, "args": list(step.args), "processes": step.processes}
    if marker.exists() and json.loads(marker.read_text()) != recorded:
        raise ConfigError(
            f"stages.{step.name}",
            list(step.args),
            f"{out.root} holds this stage started with other settings ({marker})",
            "rerun with the same settings, delete the stage's outputs and its marker, or use another output_dir",
        )
    if marker.exists() and finished(step.result):
        log.info("%-16s complete (%s)", step.name, step.result)
        return None
    atomic_write_text(marker, json.dumps(recorded, indent=1) + "\n")
    log_path = out.logs / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "%-16s running, %d thread(s)%s: %s (log: %s)",
        step.name,
        threads,
        f" as {replicas} one-thread replicas" if replicas > 1 else "",
        shlex.join(command[1:]),
        log_path,
    )
    stream = open(log_path, "a")  # closed by _finish
    stream.write(f"\n$ {shlex.join(command)}\n")
    stream.flush()
    threads_file = out.root / ".pipeline" / f"{step.name}.threads"
    per_process = threads // replicas
    write_share(threads_file, per_process)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process), THREADS_FILE: str(threads_file)}
    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    return _Running(step, process, stream, log_path, time.perf_counter(), threads_file, [threads], replicas)


def _finish(running: _Running) -> float:
    """Wait for a started stage; its wall time, or ConfigError naming the stage when it failed."""
    step = running.step
    with running.log:
        returncode = running.process.wait()
    seconds = time.perf_counter() - running.began
    if returncode != 0 or not finished(step.result):
        tail = "".join(running.log_path.read_text().splitlines(keepends=True)[-15:])
        raise ConfigError(
            f"stages.{step.name}",
            list(step.args),
            f"exited with status {returncode} after {seconds:.0f} s"
            + ("" if returncode else f" without completing {step.result}")
            + f"; the end of {running.log_path}:\n{tail}",
            "fix what the log names and rerun the same command: completed stages are kept",
        )
    log.info("%-16s done in %.0f s", step.name, seconds)
    return seconds


def waves(steps: list[Step], concurrent: bool) -> list[list[Step]]:
    """The plan's waves in order (one stage per wave unless `concurrent`)."""
    if not concurrent:
        return [[step] for step in steps]
    return [list(wave) for _, wave in groupby(sorted(steps, key=lambda s: s.wave), key=lambda s: s.wave)]


def run_wave(
    wave: list[Step], out: Paths, threads: int
) -> tuple[dict[str, float | None | ConfigError], dict[str, list[int]]]:
    """Start every stage of `wave` with an equal share of `threads` (at least one each), then wait for all of
    them. Whenever a stage ends (or is found complete), the stages still running split `threads` again, so a core
    a finished stage frees goes to the others (`steerlm.runtime.threads`; a share is never lowered). A stage that
    fails leaves the others to finish, so their work is kept for the rerun. Returns each stage's wall time (None
    for a stage already complete) or error, and the thread shares each started stage had in turn."""
    outcome: dict[str, float | None | ConfigError] = {}
    shares: dict[str, list[int]] = {}
    running: list[_Running] = []
    for step in wave:
        try:
            started = _start(step, out, max(1, threads // len(wave)))
        except ConfigError as error:
            outcome[step.name] = error
            continue
        if started is None:
            outcome[step.name] = None
        else:
            running.append(started)
    _reshare(running, threads)
    while running:
        ended = next((stage for stage in running if stage.process.poll() is not None), None)
        if ended is None:
            time.sleep(0.2)
            continue
        running.remove(ended)
        shares[ended.step.name] = ended.shares
        try:
            outcome[ended.step.name] = _finish(ended)
        except ConfigError as error:
            outcome[ended.step.name] = error
        _reshare(running, threads)
    return outcome, shares


def _reshare(running: list[_Running], threads: int) -> None:
    """Raise the share of each stage in `running` to threads // len(running) (at least one)."""
    share = max(1, threads // len(running)) if running else 0
    for stage in running:
        if share > stage.shares[-1]:
            log.info("%-16s now %d thread(s)", stage.step.name, share)
            write_share(stage.threads_file, max(1, share // stage.replicas))
            stage.shares.append(share)


def run(cfg: PipelineConfig, report: Callable[[PipelineConfig], dict]) -> dict:
    """Run (or resume) every stage, wave by wave, then `report(cfg)`; returns the report's summary.

    The first failure stops the pipeline after its wave; with `pipeline.keep_going` every stage that does not
    need a failed one still runs, and then the first failure is raised (no report is written either way).
    """
    cfg.validate()
    out = Paths(Path(cfg.output_dir).resolve())
    total_threads = cfg.pipeline.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    times: dict[str, float | None] = {}
    threads: dict[str, list[int]] = {}  # each started stage's thread shares, in turn
    failed: dict[str, ConfigError] = {}
    skipped: list[str] = []
    began = time.perf_counter()
    for wave in waves(plan(cfg), cfg.pipeline.concurrent):
        if failed and not cfg.pipeline.keep_going:
            break
        runnable = [step for step in wave if not set(step.needs) & (set(failed) | set(skipped))]
        skipped += [step.name for step in wave if step not in runnable]
        outcomes, shares = run_wave(runnable, out, total_threads)
        threads.update(shares)
        for name, outcome in outcomes.items():
            if isinstance(outcome, ConfigError):
                failed[name] = outcome
            else:
                times[name] = outcome
    if failed:
        if len(failed) > 1 or skipped:
            log.error(
                "failed: %s; not run (they need a failed stage): %s", ", ".join(failed), ", ".join(skipped) or "-"
            )
        raise next(iter(failed.values()))
    summary = report(cfg)
    total = time.perf_counter() - began
    path = out.root / "timings.json"
    seconds, reused = carry_timings(json.loads(path.read_text()) if path.exists() else {}, times)
    timings = {"seconds": {**seconds, "total": total}, "reused": reused, "threads": threads, "config": asdict(cfg)}
    atomic_write_text(path, json.dumps(timings, indent=2) + "\n")
    log.info("pipeline done in %.0f s: %s", total, out.root / "report.md")
    return summary


def carry_timings(earlier: dict, times: dict[str, float | None]) -> tuple[dict[str, float | None], list[str]]:
    """Each stage's wall time for timings.json: a stage this run found complete (None) keeps the time an earlier
    run's timings.json measured for it, so a resumed run does not overwrite what the first one measured; the names
    of those stages; None where no run measured it (one killed before its end writes no timings.json).
    `total` stays this run's wall time."""
    measured = earlier.get("seconds", {})
    seconds: dict[str, float | None] = {}
    reused = []
    for name, value in times.items():
        before = measured.get(name)
        if value is None and isinstance(before, (int, float)) and before > 0:  # files before this kept 0.0
            seconds[name] = float(before)
            reused.append(name)
        else:
            seconds[name] = value
    return seconds, reused
