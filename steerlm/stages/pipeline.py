"""The whole SteerLM pipeline on the synthetic world, one command: `recipes/pipeline.py` (what `make demo` runs).

Every stage runs as its own recipe in a subprocess — exactly the command a user would type, under torchrun
when `pipeline.parallel` needs more than one process — with its log in `<output_dir>/logs/<stage>.log`:

    world            prepare_data data=synthetic         data/ (ratings, conversations, corpus, tokenizer)
    pretrain         pretrain                            base/   the base LM that knows the world
    apm              train_attribute_model               apm/    initialised from base/
    annotate         annotate                            data/apm_labels.jsonl
    sft, sft_plain   train_sft (with/without attributes) sft/, sft_plain/   initialised from base/
    bootstrap        bootstrap                           bootstrap/   from sft/, labelled by apm/
    steer_*          evaluate_steering                   eval/steering_{sft,bootstrap,plain}.json
    report           (in this process)                   report.md, report.json, figures/*.png

A stage whose result is complete is skipped, so rerunning after a kill resumes: the interrupted stage continues
from its own checkpoints or part files. `.pipeline/<stage>.json` records the command each stage was started
with; a rerun whose command differs is refused (its outputs would mix two settings).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from steerlm.config import ConfigError, ParallelConfig, to_typed
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.store import CONF_DIR, RECIPES_DIR
from steerlm.files import atomic_write_text

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Step:
    name: str
    recipe: str
    args: tuple[str, ...]
    result: Path  # exists (and says it finished) once the stage is complete
    processes: int = 1

    def command(self) -> list[str]:
        script = str(RECIPES_DIR / f"{self.recipe}.py")
        if self.processes == 1:
            return [sys.executable, script, *self.args]
        # --standalone: torchrun picks a free rendezvous port, so two pipelines on one machine never collide
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(self.processes),
        ]
        return [*launcher, script, *self.args]


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


def plan(cfg: PipelineConfig) -> list[Step]:
    """The stages' commands, in order, with absolute paths chaining them."""
    out = Paths(Path(cfg.output_dir).resolve())
    data = out.data
    layout = cfg.pipeline.parallel
    processes = layout_processes(layout)
    common = [f"tokenizer.path={data / 'tokenizer'}", f"parallel={layout}"]
    world = [f"synthetic.{f.name}={getattr(cfg.synthetic, f.name)}" for f in fields(cfg.synthetic)]
    sft_args = [
        *common,
        f"sft.init_from={out.base}",
        f"data.train_file={data / 'apm_labels.jsonl'}",
        "data.format=conversation",
    ]
    steer = [f"prompts={data / 'eval_prompts.jsonl'}", f"world={data / 'world.json'}", f"parallel={layout}"]
    steps = [
        Step("world", "prepare_data", ("data=synthetic", f"output={data}", *world), data / "summary.json"),
        Step(
            "pretrain",
            "pretrain",
            (*common, f"output_dir={out.base}", f"data.train_file={data / 'corpus.jsonl'}"),
            out.base / "summary.json",
            processes,
        ),
        Step(
            "apm",
            "train_attribute_model",
            (
                *common,
                f"output_dir={out.apm}",
                f"apm.init_from={out.base}",
                f"data.train_file={data / 'annotated.jsonl'}",
            ),
            out.apm / "eval.json",
            processes,
        ),
        Step(
            "annotate",
            "annotate",
            (
                f"apm_checkpoint={out.apm}",
                f"input={data / 'unlabelled.jsonl'}",
                f"output={data / 'apm_labels.jsonl'}",
                f"parallel={layout}",
            ),
            data / "apm_labels.jsonl.summary.json",
            processes,
        ),
        Step("sft", "train_sft", (*sft_args, f"output_dir={out.sft}"), out.sft / "eval.json", processes),
        Step(
            "sft_plain",
            "train_sft",
            (*sft_args, f"output_dir={out.sft_plain}", "sft.condition_on_attributes=false"),
            out.sft_plain / "eval.json",
            processes,
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
            ),
            out.bootstrap / "eval.json",
            processes,
        ),
        Step(
            "steer_sft",
            "evaluate_steering",
            (*steer, f"checkpoint={out.sft}", f"output={out.eval / 'steering_sft.json'}"),
            out.eval / "steering_sft.json",
            processes,
        ),
        Step(
            "steer_bootstrap",
            "evaluate_steering",
            (*steer, f"checkpoint={out.bootstrapped}", f"output={out.eval / 'steering_bootstrap.json'}"),
            out.eval / "steering_bootstrap.json",
            processes,
        ),
        Step(
            "steer_plain",
            "evaluate_steering",
            (*steer, f"checkpoint={out.sft_plain}", "only_base=true", f"output={out.eval / 'steering_plain.json'}"),
            out.eval / "steering_plain.json",
            processes,
        ),
    ]
    return [Step(s.name, s.recipe, (*s.args, *cfg.stages.get(s.name, [])), s.result, s.processes) for s in steps]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the pipeline process dies (even by kill -9), so no stage outlives it; a
    training stage checkpoints on SIGTERM and the rerun resumes from there."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_step(step: Step, out: Paths) -> float:
    """Run one stage (or skip it when complete); returns its wall time. ConfigError naming the stage when its
    recorded command differs or it fails."""
    marker = out.root / ".pipeline" / f"{step.name}.json"
    command = step.command()
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
        return 0.0
    atomic_write_text(marker, json.dumps(recorded, indent=1) + "\n")
    log_path = out.logs / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%-16s running: %s (log: %s)", step.name, shlex.join(command[1:]), log_path)
    began = time.perf_counter()
    with open(log_path, "a") as stream:
        stream.write(f"\n$ {shlex.join(command)}\n")
        stream.flush()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    seconds = time.perf_counter() - began
    if done.returncode != 0 or not finished(step.result):
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise ConfigError(
            f"stages.{step.name}",
            list(step.args),
            f"exited with status {done.returncode} after {seconds:.0f} s"
            + ("" if done.returncode else f" without completing {step.result}")
            + f"; the end of {log_path}:\n{tail}",
            "fix what the log names and rerun the same command: completed stages are kept",
        )
    log.info("%-16s done in %.0f s", step.name, seconds)
    return seconds


def run(cfg: PipelineConfig, report: Callable[[PipelineConfig], dict]) -> dict:
    """Run (or resume) every stage, then `report(cfg)`; returns the report's summary."""
    cfg.validate()
    out = Paths(Path(cfg.output_dir).resolve())
    steps = plan(cfg)
    times: dict[str, float] = {}
    began = time.perf_counter()
    for step in steps:
        times[step.name] = run_step(step, out)
    summary = report(cfg)
    times["total"] = time.perf_counter() - began
    atomic_write_text(out.root / "timings.json", json.dumps({"seconds": times, "config": asdict(cfg)}, indent=2) + "\n")
    log.info("pipeline done in %.0f s: %s", times["total"], out.root / "report.md")
    return summary
