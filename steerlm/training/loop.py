"""The training loop every stage shares: steps, logging (metrics.jsonl + progress bar), evaluation.

Stages supply batches (a function of the step index, so a run is reproducible) and a loss function.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from steerlm.config.schema import TrainerConfig
from steerlm.runtime.layout import ParallelLayout
from steerlm.training.batching import microbatches_for_rank
from steerlm.training.losses import masked_token_loss
from steerlm.training.step import Batch, LossFunc, forward_backward, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedStep:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    elapsed: float


@torch.no_grad()
def evaluate(model: list, batches: list[Batch], micro_batch_size: int, layout: ParallelLayout,
             loss_func: LossFunc = masked_token_loss) -> float:
    """Mean loss over every trained token of `batches` (global batches), forward only."""
    for chunk in model:
        chunk.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, tokens = forward_backward(model, microbatches_for_rank(batch, micro_batch_size, layout), layout,
                                        loss_func, forward_only=True)
        total, count = total + loss * tokens, count + tokens
    for chunk in model:
        chunk.train()
    return total / max(count, 1)


def run_training(model: list, optimizer, scheduler, layout: ParallelLayout, trainer: TrainerConfig,
                 output_dir: Path, train_batch: Callable[[int], Batch],
                 loss_func: LossFunc = masked_token_loss) -> list[LoggedStep]:
    """Train `trainer.max_steps` steps on `train_batch(step)` global batches; returns the logged steps.

    Rank 0 appends one JSON object per logged step to `output_dir/metrics.jsonl` and shows a progress
    bar; every rank computes the same losses.
    """
    metrics = output_dir / "metrics.jsonl"
    history: list[LoggedStep] = []
    start = window_start = time.perf_counter()
    window_tokens = 0
    bar = tqdm(total=trainer.max_steps, desc="train", unit="step", disable=not layout.is_rank_zero, dynamic_ncols=True)
    with bar, (metrics.open("a") if layout.is_rank_zero else open(os.devnull, "w")) as sink:
        for step in range(1, trainer.max_steps + 1):
            microbatches = microbatches_for_rank(train_batch(step), trainer.micro_batch_size, layout)
            result = train_step(model, optimizer, scheduler, microbatches, layout, loss_func)
            window_tokens += result.num_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
            if step % trainer.log_interval == 0 or step == trainer.max_steps:
                now = time.perf_counter()
                logged = LoggedStep(step=step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                                    tokens_per_s=window_tokens / max(now - window_start, 1e-9), elapsed=now - start)
                window_start, window_tokens = now, 0
                history.append(logged)
                sink.write(json.dumps(asdict(logged)) + "\n")
                sink.flush()
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %s %.0f tokens/s", step, trainer.max_steps,
                         logged.loss, logged.lr, f"{logged.grad_norm:.3f}" if logged.grad_norm is not None else "-",
                         logged.tokens_per_s)
    return history

