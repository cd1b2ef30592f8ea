"""One optimizer step over a global batch: megatron's forward/backward schedule, then the optimizer.

Stages differ only in the `Task` they pass (see `steerlm.training.losses`); micro-batches are
dicts of `[micro_batch_size, seq_length]` tensors with `tokens`, `labels`, `loss_mask`, `position_ids`
and, for packed sequences, a `[micro_batch_size, 1, seq_length, seq_length]` `attention_mask`.
Micro-batches may differ in length (dynamic padding).
Every rank of a model-parallel group receives the same micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from steerlm.runtime.layout import ParallelLayout
from steerlm.training.guards import gradients_finite
from steerlm.training.losses import LANGUAGE_MODEL, Batch, Task


@dataclass(frozen=True)
class StepResult:
    """Loss is the mean over the global batch's trained tokens; identical on every rank."""

    loss: float
    num_tokens: int
    grad_norm: float | None
    lr: float
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)  # the task's other report entries, e.g. distance
    finite: bool = True  # False: the loss or the gradients held NaN/Inf and the optimizer step was skipped


def _loss(task: Task, batch: Batch, output: torch.Tensor, non_loss_data: bool = False):
    """megatron calls this with `non_loss_data=True` when collecting predictions."""
    if not non_loss_data:
        return task.loss(batch, output)
    if task.predict is None:
        raise ValueError("forward-only prediction needs a task with `predict` (e.g. ATTRIBUTE_REGRESSION)")
    return task.predict(batch, output).detach()


def _forward_step(task: Task, device: torch.device, data_iterator, model):
    batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
    return task.forward(model, batch), partial(_loss, task, batch)


def _run_schedule(
    model: list,
    microbatches: list[Batch],
    layout: ParallelLayout,
    task: Task,
    forward_only: bool,
    collect_predictions: bool,
) -> list:
    micro_batch_size, seq_length = microbatches[0]["tokens"].shape
    schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.vpp)
    iterators = [iter(microbatches) for _ in model]
    pipeline = {}
    if layout.pp > 1:  # megatron wants the p2p communicator whenever process groups are passed explicitly
        pipeline["p2p_communicator"] = P2PCommunicator(layout.pg_collection.pp, model[0].config)
    return schedule(
        forward_step_func=partial(_forward_step, task, layout.device),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_predictions,
        pg_collection=layout.pg_collection,
        **pipeline,
    )


def forward_backward(
    model: list,
    microbatches: list[Batch],
    layout: ParallelLayout,
    task: Task = LANGUAGE_MODEL,
    forward_only: bool = False,
) -> tuple[float, int]:
    """Run megatron's schedule over `microbatches`; returns (mean loss, token count) of the global batch.

    Gradients are left in the DDP buffers, already reduced across data-parallel ranks and divided by
    the global token count (megatron's `finalize_model_grads`), when `forward_only` is False.
    """
    loss, count, _ = forward_backward_metrics(model, microbatches, layout, task, forward_only)
    return loss, count


def forward_backward_metrics(
    model: list,
    microbatches: list[Batch],
    layout: ParallelLayout,
    task: Task = LANGUAGE_MODEL,
    forward_only: bool = False,
) -> tuple[float, int, dict[str, float]]:
    """`forward_backward`, plus the global-batch mean of each of the task's `metrics`; runs the task's
    `prepare` pass first."""
    microbatches = _prepared(model, microbatches, layout, task)
    reports = _run_schedule(model, microbatches, layout, task, forward_only, collect_predictions=False)
    return _reduce_reports(reports, layout, ("loss", *task.metrics))


def _prepared(model: list, microbatches: list[Batch], layout: ParallelLayout, task: Task) -> list[Batch]:
    """The task's `prepare` over `microbatches`, given a no-grad prediction pass of the current weights (in eval
    mode: the model's own predictions, no dropout drawn)."""
    if task.prepare is None:
        return microbatches

    def forward_only(batches: list[Batch], pass_task: Task) -> list[torch.Tensor]:
        modes = [chunk.training for chunk in model]
        for chunk in model:
            chunk.eval()
        try:
            with torch.no_grad():
                return predict(model, batches, layout, pass_task)
        finally:
            for chunk, mode in zip(model, modes):
                chunk.train(mode)

    return task.prepare(microbatches, forward_only)


def _reduce_reports(
    reports: list[dict[str, torch.Tensor]], layout: ParallelLayout, names: tuple[str, ...]
) -> tuple[float, int, dict[str, float]]:
    """Sum each named [sum, count] over micro-batches (last stage) and data-parallel ranks; share with all
    stages. Returns the first name's mean and count, and the others' means."""
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=layout.device)
    for report in reports:
        for row, name in enumerate(names):
            total[row] += report[name].to(total)
    groups = layout.pg_collection
    dist.all_reduce(total, group=groups.dp_cp)
    if layout.pp > 1:
        last = dist.get_global_rank(groups.pp, layout.pp - 1)
        dist.broadcast(total, src=last, group=groups.pp)
    (loss_sum, count), *others = total.tolist()
    means = {name: value / max(items, 1.0) for name, (value, items) in zip(names[1:], others)}
    return loss_sum / max(count, 1.0), int(count), means


def predict(model: list, microbatches: list[Batch], layout: ParallelLayout, task: Task) -> list[torch.Tensor]:
    """Forward only; `task.predict` outputs of each micro-batch, on every rank of the pipeline.

    The last stage computes them; other stages receive them (shapes included) by broadcast.
    """
    outputs = _run_schedule(model, microbatches, layout, task, forward_only=True, collect_predictions=True)
    if layout.pp == 1:
        return list(outputs)
    holder = [list(outputs) if layout.is_last_stage else None]
    dist.broadcast_object_list(
        holder, src=dist.get_global_rank(layout.pg_collection.pp, layout.pp - 1), group=layout.pg_collection.pp
    )
    received = holder[0]
    if received is None:
        raise RuntimeError("the last pipeline stage broadcast no predictions")
    return [output.to(layout.device) for output in received]


def train_step(
    model: list,
    optimizer,
    scheduler,
    microbatches: list[Batch],
    layout: ParallelLayout,
    task: Task = LANGUAGE_MODEL,
    check_gradients: bool = True,
) -> StepResult:
    """Zero grads, set this step's LR, forward/backward every micro-batch, clip and step the optimizer.

    The optimizer step is skipped (`finite=False`) when the loss, or with `check_gradients` any gradient, is
    NaN/Inf (steerlm.training.guards); the loss is identical on every rank and the gradient check collective,
    so every rank decides alike.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # Advance first, so step k (1-based) runs at the schedule's LR for k: warmup never takes a step
    # at LR 0 (megatron's scheduler starts at init_lr = 0 when warming up).
    scheduler.step(increment=1)
    lr = optimizer.param_groups[0]["lr"]
    loss, num_tokens, metrics = forward_backward_metrics(model, microbatches, layout, task)
    if not math.isfinite(loss) or (check_gradients and not gradients_finite(model, layout)):
        return StepResult(loss, num_tokens, None, lr, skipped=True, metrics=metrics, finite=False)
    updated, grad_norm, _ = optimizer.step()
    return StepResult(
        loss=loss,
        num_tokens=num_tokens,
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        skipped=not updated,
        metrics=metrics,
    )
