"""The one shape of a training stage, and the one function that runs any of them.

Every training stage (pretraining, the APM, SFT, the bootstrap's fine-tuning, SteerLM 2.0) is the same
sequence; a stage supplies only what differs:

    validate the root config (once, before anything is built)   cfg.validate(world size, accelerator)
    check what the files allow (resume, init_from)              stage.prepare(cfg, output_dir) → InitSource | None
    read and tokenise the data (every data error surfaces here) stage.load_data(cfg, output_dir) → D
    process groups, model (stage.model_provider), DDP, optimizer
    resume this run, or start from init_from's weights
    batches for this layout                                     stage.batches(ctx, D) → StageData
    the one training loop with the stage's Task                 stage.task(cfg)
    the stage's result, written to <output_dir>/eval.json       stage.report(ctx, D, outcome, before)

so a new stage is a data builder, a task and a report — a few dozen lines of wiring (docs/architecture.md).
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from steerlm import runtime
from steerlm.config import TrainConfig, save_resolved
from steerlm.files import atomic_write_text
from steerlm.models.gpt import build_model_chunks
from steerlm.runtime.layout import ParallelLayout
from steerlm.training import LANGUAGE_MODEL, Task, TrainingSetup, build_training
from steerlm.training.init_from import InitSource, resume_or_initialise
from steerlm.training.loop import TrainingOutcome, prepare_run_dir, run_training
from steerlm.training.step import Batch

log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"

C = TypeVar("C", bound=TrainConfig)
D = TypeVar("D")


@dataclass
class StageContext(Generic[C]):
    """What a stage sees once the model is built: its config, layout, model/optimizer, run directory and the
    step it starts after (0, or the resumed checkpoint's)."""

    cfg: C
    layout: ParallelLayout
    setup: TrainingSetup
    output_dir: Path
    start_step: int


@dataclass
class StageData:
    """The loop's inputs: `train_batch(step)` gives step's global batch (the same on every rank and rerun),
    `valid_batches` the validation set (empty: no validation), `validation_metrics` a stage's own collective
    scalars logged at each validation."""

    train_batch: Callable[[int], Batch]
    valid_batches: list[Batch]
    validation_metrics: Callable[[], dict[str, float]] | None = None
    group_size: int = 1  # rows per example that must stay in one micro-batch (SteerLM 2.0's responses)


class TrainingStage(abc.ABC, Generic[C, D]):
    """A training stage: override `load_data`, `batches` and `report`; the rest has defaults."""

    def prepare(self, cfg: C, output_dir: Path) -> InitSource | None:
        """Checks the files allow (e.g. refusing to resume another stage's checkpoint); returns the weights
        `init_from` names, resolved and shape-checked (None: a fresh model)."""
        return None

    @abc.abstractmethod
    def load_data(self, cfg: C, output_dir: Path) -> D:
        """Read and tokenise everything, before any process group exists."""

    def model_provider(self, cfg: C) -> Callable:
        return build_model_chunks

    def task(self, cfg: C) -> Task:
        return LANGUAGE_MODEL

    @abc.abstractmethod
    def batches(self, ctx: StageContext[C], data: D) -> StageData:
        """The loop's inputs for this layout."""

    def before_training(self, ctx: StageContext[C], data: D, stage_data: StageData) -> Any:
        """Collective, before the first step (e.g. the initial validation loss); passed to `report`."""
        return None

    @abc.abstractmethod
    def report(self, ctx: StageContext[C], data: D, outcome: TrainingOutcome, before: Any) -> Any:
        """Collective, after training: the stage's result (a dataclass or dict), written to eval.json."""


def run_stage(stage: TrainingStage[C, D], cfg: C, result_file: str = EVAL_FILE) -> Any:
    """Validate, read, build, resume or initialise, train, report (see the module docstring)."""
    cfg.validate(runtime.launch_world_size(), runtime.detect_accelerator())
    output_dir = prepare_run_dir(cfg.output_dir)
    init = stage.prepare(cfg, output_dir)
    data = stage.load_data(cfg, output_dir)
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        if layout.is_rank_zero:
            save_resolved(cfg, output_dir / "config.yaml")
        setup = build_training(cfg, layout, stage.model_provider(cfg))
        start = resume_or_initialise(cfg, output_dir, setup, layout, init)
        ctx = StageContext(cfg, layout, setup, output_dir, start)
        stage_data = stage.batches(ctx, data)
        before = stage.before_training(ctx, data, stage_data)
        valid = stage_data.valid_batches
        outcome = run_training(
            setup,
            layout,
            cfg,
            output_dir,
            stage_data.train_batch,
            start_step=start,
            valid_batches=(lambda: valid) if valid else None,
            task=stage.task(cfg),
            validation_metrics=stage_data.validation_metrics,
            group_size=stage_data.group_size,
        )
        result = stage.report(ctx, data, outcome, before)
        if layout.is_rank_zero:
            payload = asdict(result) if is_dataclass(result) and not isinstance(result, type) else result
            atomic_write_text(output_dir / result_file, json.dumps(payload, indent=2) + "\n")
        return result
    finally:
        runtime.shutdown()
