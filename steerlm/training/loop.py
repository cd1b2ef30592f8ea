"""The training loop every stage shares.

Stages supply batches as a function of the step (so a resumed run sees exactly the batches an
uninterrupted one would), optional validation batches and a `Task` (model call + loss); the loop runs the steps,
logs, validates, checkpoints on schedule, on SIGTERM/SIGUSR1 and at the wall-time limit, and resumes
from the run directory's latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from steerlm.checkpoint.sharded import check_checkpoints_writable, load_checkpoint, resume_checkpoint
from steerlm.config.schema import DType, TrainConfig
from steerlm.errors import ConfigError
from steerlm.runtime.layout import ParallelLayout
from steerlm.runtime.threads import ThreadShare
from steerlm.training.batching import microbatches_for_rank
from steerlm.training.guards import NonFiniteSteps, NonFiniteTraining, require_finite_weights
from steerlm.training.losses import LANGUAGE_MODEL, Task
from steerlm.training.metrics import LoggedStep, MetricsLog
from steerlm.training.saver import CheckpointSaver
from steerlm.training.setup import TrainingSetup
from steerlm.training.signals import StopRequests
from steerlm.training.step import Batch, forward_backward_metrics, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainingOutcome:
    start_step: int  # the step the run resumed from (0 for a fresh run)
    last_step: int
    stop_reason: str | None = None  # set when stopped early by a signal or the time limit
    history: list[LoggedStep] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)


def evaluate(
    model: list, batches: list[Batch], micro_batch_size: int, layout: ParallelLayout, task: Task = LANGUAGE_MODEL
) -> float:
    """Mean loss over every trained token of `batches` (global batches), forward only."""
    return evaluate_metrics(model, batches, micro_batch_size, layout, task)[0]


@torch.no_grad()
def evaluate_metrics(
    model: list, batches: list[Batch], micro_batch_size: int, layout: ParallelLayout, task: Task = LANGUAGE_MODEL
) -> tuple[float, dict[str, float]]:
    """`evaluate`, plus the task's `metrics` over `batches` (each batch's mean weighted by its loss count)."""
    for chunk in model:
        chunk.eval()
    total, count, others = 0.0, 0, dict.fromkeys(task.metrics, 0.0)
    for batch in batches:
        loss, items, metrics = forward_backward_metrics(
            model, microbatches_for_rank(batch, micro_batch_size, layout), layout, task, forward_only=True
        )
        total, count = total + loss * items, count + items
        others = {name: others[name] + metrics[name] * items for name in others}
    for chunk in model:
        chunk.train()
    return total / max(count, 1), {name: value / max(count, 1) for name, value in others.items()}


def prepare_output_dir(path: str) -> Path:
    """Create the run directory or fail with a ConfigError that names `output_dir`."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            "output_dir", path, f"cannot be created ({error.strerror})", "pass output_dir=<a writable directory>"
        ) from error
    if not os.access(out, os.W_OK):
        raise ConfigError("output_dir", path, "is not writable", "pass output_dir=<a writable directory>")
    return out


def prepare_run_dir(path: str) -> Path:
    """`prepare_output_dir` for a training run, with its checkpoints/ checked writable before anything is built:
    a run that cannot save would otherwise waste every step until its first save."""
    out = prepare_output_dir(path)
    check_checkpoints_writable(out)
    return out


def maybe_resume(cfg: TrainConfig, output_dir: Path, setup: TrainingSetup, layout: ParallelLayout) -> int:
    """Collective: load the run's latest intact checkpoint when resuming is enabled and one exists (a damaged
    latest one is set aside, see `resume_checkpoint`); returns its step."""
    if not cfg.checkpoint.resume:
        return 0
    path = resume_checkpoint(output_dir, cfg.checkpoint.verify)
    if path is None:
        return 0
    return load_checkpoint(path, setup.model, setup.optimizer, setup.scheduler, layout, cfg.model, verify=False)


def run_training(
    setup: TrainingSetup,
    layout: ParallelLayout,
    cfg: TrainConfig,
    output_dir: Path,
    train_batch: Callable[[int], Batch],
    start_step: int = 0,
    valid_batches: Callable[[], list[Batch]] | None = None,
    task: Task = LANGUAGE_MODEL,
    validation_metrics: Callable[[], dict[str, float]] | None = None,
    group_size: int = 1,
) -> TrainingOutcome:
    """Train steps `start_step + 1 … trainer.max_steps` on `train_batch(step)` global batches.

    `validation_metrics` (collective, called on every rank at each validation) adds a stage's own
    scalars to the validation loss in metrics.jsonl and TensorBoard; the task's own `metrics` are logged
    next to the loss in training and validation. `group_size` rows make one item of `trainer.*_batch_size`
    (SteerLM 2.0: a prompt's responses), so a micro-batch holds `micro_batch_size x group_size` rows.
    """
    trainer, save_interval = cfg.trainer, cfg.checkpoint.save_interval
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    outcome = TrainingOutcome(start_step=start_step, last_step=start_step)
    metrics = MetricsLog(output_dir, layout.is_rank_zero, start_step)
    bar = tqdm(
        total=trainer.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not layout.is_rank_zero,
        dynamic_ncols=True,
    )
    start = window_start = time.perf_counter()
    window_tokens = 0
    non_finite = NonFiniteSteps(trainer.nan_tolerance)
    check_gradients = cfg.precision.dtype != DType.fp16  # fp16's loss scaler skips its own overflows
    # the pipeline raises a stage's threads when its wave-mates finish, unless the stage fixed its own
    threads = ThreadShare.from_environment() if trainer.torch_threads is None else ThreadShare(None)
    saver = CheckpointSaver(output_dir, setup, layout, cfg)
    try:
        with StopRequests(trainer.max_time_minutes, layout.device) as stops, bar:
            for step in range(start_step + 1, trainer.max_steps + 1):
                threads.poll()
                microbatches = microbatches_for_rank(train_batch(step), trainer.micro_batch_size * group_size, layout)
                result = train_step(model, optimizer, scheduler, microbatches, layout, task, check_gradients)
                non_finite.observe(step, result.loss, not result.finite, result.grad_norm)
                outcome.last_step = step
                window_tokens += result.num_tokens
                bar.update(1)
                shown = {name: f"{value:.4f}" for name, value in result.metrics.items()}
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", **shown)
                if step % trainer.log_interval == 0 or step == trainer.max_steps:
                    now = time.perf_counter()
                    logged = LoggedStep(
                        step=step,
                        loss=result.loss,
                        lr=result.lr,
                        grad_norm=result.grad_norm,
                        tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                        elapsed=now - start,
                        metrics=result.metrics,
                    )
                    window_start, window_tokens = now, 0
                    outcome.history.append(logged)
                    metrics.log_train(logged)
                    _log_step(logged, trainer.max_steps)
                saver.poll()
                stop = stops.should_stop()
                last = step == trainer.max_steps
                if (
                    valid_batches is not None
                    and not stop
                    and (last or (trainer.eval_interval and step % trainer.eval_interval == 0))
                ):
                    rows = trainer.micro_batch_size * group_size
                    loss, extra = evaluate_metrics(model, valid_batches(), rows, layout, task)
                    outcome.evaluations.append((step, loss))
                    metrics.log_eval(step, loss, {**extra, **(validation_metrics() if validation_metrics else {})})
                    log.info("step %d validation loss %.4f", step, loss)
                if stop or last or (save_interval and step % save_interval == 0):
                    require_finite_weights(model, layout, step)
                    saver.save(step, final=stop or last)
                if stop:
                    outcome.stop_reason = stops.reason
                    log.warning("stopping after step %d (%s); checkpoint saved", step, stops.reason)
                    break
    except NonFiniteTraining:  # raised on every rank at one step: the save in flight holds finite weights
        saver.wait()
        raise
    except BaseException:
        saver.abandon()
        raise
    finally:
        metrics.close()
    return outcome


def _log_step(logged: LoggedStep, max_steps: int) -> None:
    grad_norm = f"{logged.grad_norm:.3f}" if logged.grad_norm is not None else "-"
    extra = "".join(f" {name} {value:.4f}" for name, value in logged.metrics.items())
    log.info(
        "step %d/%d loss %.4f%s lr %.2e grad_norm %s %.0f tokens/s",
        logged.step,
        max_steps,
        logged.loss,
        extra,
        logged.lr,
        grad_norm,
        logged.tokens_per_s,
    )
