"""One optimizer step over a global batch: megatron's forward/backward schedule, then the optimizer.

Stages differ only in the `loss_func` they pass (see `steerlm.training.losses`); micro-batches are
dicts of `[micro_batch_size, seq_length]` tensors with `tokens`, `labels`, `loss_mask`, `position_ids`
and, for packed sequences, a `[micro_batch_size, 1, seq_length, seq_length]` `attention_mask`.
Micro-batches may differ in length (dynamic padding).
Every rank of a model-parallel group receives the same micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from steerlm.runtime.layout import ParallelLayout
from steerlm.training.losses import masked_token_loss

Batch = dict[str, torch.Tensor]
LossFunc = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class StepResult:
    """Loss is the mean over the global batch's trained tokens; identical on every rank."""

    loss: float
    num_tokens: int
    grad_norm: float | None
    lr: float
    skipped: bool


def _forward_step(loss_func: LossFunc, device: torch.device, data_iterator, model):
    batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def forward_backward(model: list, microbatches: list[Batch], layout: ParallelLayout,
                     loss_func: LossFunc = masked_token_loss, forward_only: bool = False) -> tuple[float, int]:
    """Run megatron's schedule over `microbatches`; returns (mean loss, token count) of the global batch.

    Gradients are left in the DDP buffers, already reduced across data-parallel ranks and divided by
    the global token count (megatron's `finalize_model_grads`), when `forward_only` is False.
    """
    micro_batch_size, seq_length = microbatches[0]["tokens"].shape
    schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.vpp)
    iterators = [iter(microbatches) for _ in model]
    pipeline = {}
    if layout.pp > 1:  # megatron wants the p2p communicator whenever process groups are passed explicitly
        pipeline["p2p_communicator"] = P2PCommunicator(layout.pg_collection.pp, model[0].config)
    reports = schedule(
        forward_step_func=partial(_forward_step, loss_func, layout.device),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        pg_collection=layout.pg_collection,
        **pipeline,
    )
    return _reduce_reports(reports, layout)


def _reduce_reports(reports: list[dict[str, torch.Tensor]], layout: ParallelLayout) -> tuple[float, int]:
    """Sum [loss_sum, count] over micro-batches (last stage) and data-parallel ranks; share with all stages."""
    total = torch.zeros(2, dtype=torch.float64, device=layout.device)
    for report in reports:
        total += report["lm_loss"].to(total)
    groups = layout.pg_collection
    dist.all_reduce(total, group=groups.dp_cp)
    if layout.pp > 1:
        last = dist.get_global_rank(groups.pp, layout.pp - 1)
        dist.broadcast(total, src=last, group=groups.pp)
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1.0), int(count)


def train_step(model: list, optimizer, scheduler, microbatches: list[Batch], layout: ParallelLayout,
               loss_func: LossFunc = masked_token_loss) -> StepResult:
    """Zero grads, set this step's LR, forward/backward every micro-batch, clip and step the optimizer."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # Advance first, so step k (1-based) runs at the schedule's LR for k: warmup never takes a step
    # at LR 0 (megatron's scheduler starts at init_lr = 0 when warming up).
    scheduler.step(increment=1)
    lr = optimizer.param_groups[0]["lr"]
    loss, num_tokens = forward_backward(model, microbatches, layout, loss_func)
    updated, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, num_tokens=num_tokens, grad_norm=None if grad_norm is None else float(grad_norm),
                      lr=lr, skipped=not updated)
