"""Non-finite numbers stop training instead of being trained on and saved.

Without a check, a NaN loss (damaged weights, an overflow, a bad batch) keeps "training" for hundreds of steps,
NaN weights are checkpointed and the job exits 0. Like Megatron's `check_for_nan_in_loss_and_grad`, each step
checks the loss and the gradients before the optimizer may use them; `trainer.nan_tolerance` allows that many
such steps to be skipped (no update: weights and optimizer state stay as they were) before training stops with
an error naming the step. Under fp16 the loss scaler's own overflow skips are left to it: its scaled gradients
overflow by design, so only the loss is checked there. A checkpoint is never written from non-finite weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """Training met NaN/Inf more often than `trainer.nan_tolerance` allows (or in the weights before a save)."""


def _any_non_finite(tensors: Iterable[torch.Tensor], layout: ParallelLayout) -> bool:
    """True when any of `tensors` holds NaN/Inf on any rank (collective over the world).

    A sum is NaN/Inf whenever one of its terms is (NaN propagates; an Inf stays Inf or meets -Inf as NaN), so
    one reduction per tensor screens them: `isfinite(t).all()` reads a tensor four times over (abs, two
    comparisons, all: 272 ms against 9 ms for a sum of 52M fp32 numbers on 2 CPU cores). A non-finite sum of
    finite numbers (an fp32 overflow, |sum| > 3.4e38) is told apart by the elementwise check, which runs only
    when the screen trips, on every rank alike (the screen's flag is reduced over the world first).
    """
    tensors = list(tensors)
    sums = [tensor.sum(dtype=torch.float32) for tensor in tensors]
    if not _world_flag([torch.stack(sums)] if sums else [], layout):
        return False
    return _world_flag(tensors, layout)


def _world_flag(tensors: list[torch.Tensor], layout: ParallelLayout) -> bool:
    """Collective: whether any of `tensors` holds NaN/Inf on any rank (one device sync)."""
    checks = [torch.isfinite(tensor).all() for tensor in tensors]
    finite = torch.stack(checks).all() if checks else torch.tensor(True)
    flag = (~finite).to(device=layout.device, dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gradients_finite(model: list, layout: ParallelLayout) -> bool:
    """Collective: every rank's gradients (megatron DDP's `main_grad` buffers, after their reduction) are finite.

    Each rank checks its own buffers; with the distributed optimizer a NaN in any rank's unreduced part shows
    in its reduced shard too, so a MAX over the world is exact in every layout.
    """
    grads = (_gradient(param) for chunk in model for param in chunk.parameters() if param.requires_grad)
    return not _any_non_finite((grad for grad in grads if grad is not None), layout)


def _gradient(param: torch.nn.Parameter) -> torch.Tensor | None:
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def require_finite_weights(model: list, layout: ParallelLayout, step: int) -> None:
    """Collective: refuse to save a checkpoint of weights that hold NaN/Inf."""
    if _any_non_finite((param.detach() for chunk in model for param in chunk.parameters()), layout):
        raise NonFiniteTraining(
            f"step {step}: the weights hold NaN/Inf, so no checkpoint is written; the last checkpoint is the "
            "newest finite state. Fix: lower optim.lr or check the data of the steps since that checkpoint"
        )


class NonFiniteSteps:
    """Counts the steps whose loss or gradient was not finite; raises once there are more than `tolerance`."""

    def __init__(self, tolerance: int) -> None:
        self.tolerance = tolerance
        self.seen = 0

    def observe(self, step: int, loss: float, update_skipped: bool, grad_norm: float | None) -> None:
        """One step's outcome: `update_skipped` when train_step found NaN/Inf before the optimizer step."""
        if not math.isfinite(loss):
            what = f"the loss is {loss} (no update)"
        elif update_skipped:
            what = "the gradients hold NaN/Inf (no update)"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            what = f"the gradient norm is {grad_norm} (the update, clipped, was applied)"
        else:
            return
        self.seen += 1
        if self.seen > self.tolerance:
            raise NonFiniteTraining(
                f"step {step}: {what}; training stopped ({self.seen} non-finite steps, "
                f"trainer.nan_tolerance={self.tolerance}) and no checkpoint of this step is written. Fix: lower "
                "optim.lr, check this step's data, resume from the last checkpoint, or raise trainer.nan_tolerance "
                "to skip such steps"
            )
        log.warning("step %d: %s; tolerated (%d of trainer.nan_tolerance=%d)", step, what, self.seen, self.tolerance)
