"""Per-stage tasks: how a micro-batch goes through the model and becomes a loss.

Losses use megatron's per-token form: (sum, count, report). Returning sums and counts
(`calculate_per_token_loss`) makes a step's loss the mean over every counted item of the global
batch — trained tokens for language modelling, labelled (row, attribute) pairs for the regression
APM — whatever the micro-batch split, pipeline schedule or data-parallel size, so layouts agree
exactly even when micro-batches hold different counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from steerlm.data.attributes import MISSING

Batch = dict[str, torch.Tensor]
LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Task:
    """`forward(model, batch)` → the model's output; `loss(batch, output)` → (sum, count, report);
    `predict(batch, output)` → per-row outputs collected by forward-only prediction (optional)."""

    forward: Callable[[torch.nn.Module, Batch], torch.Tensor]
    loss: Callable[[Batch, torch.Tensor], LossResult]
    predict: Callable[[Batch, torch.Tensor], torch.Tensor] | None = None


def _report(loss_sum: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached `[sum, count]`, summed over micro-batches and ranks by the training step."""
    return {"loss": torch.stack([loss_sum.detach().clone(), count.detach().to(torch.float32)])}


def language_model_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Megatron GPTModel's `[b, s]` vocab-parallel cross entropy against `labels`."""
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])


def masked_token_loss(batch: Batch, per_token_loss: torch.Tensor) -> LossResult:
    """Language-model loss over the tokens where `batch["loss_mask"]` is 1."""
    loss_mask = batch["loss_mask"]
    loss_sum = (per_token_loss.float() * loss_mask.to(torch.float32)).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, _report(loss_sum, num_tokens)


LANGUAGE_MODEL = Task(forward=language_model_forward, loss=masked_token_loss)


def attribute_scores_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """AttributeGPTModel's `[b, s, num_attributes]` scores at every position."""
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))


def scores_at_index(batch: Batch, scores: torch.Tensor) -> torch.Tensor:
    """`[b, num_attributes]`: each row's scores at its `score_index` (the token after the response)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, batch["score_index"]].float()


def attribute_regression_loss(batch: Batch, scores: torch.Tensor, weights: torch.Tensor | None = None) -> LossResult:
    """Masked (optionally weighted) squared error over labelled attributes.

    `batch["targets"]` is `[b, num_attributes]` with MISSING (-100) where a label is absent: those
    outputs contribute neither loss nor gradient.
    """
    predictions = scores_at_index(batch, scores)
    targets = batch["targets"].to(predictions)
    labelled = targets != MISSING
    squared = torch.where(labelled, (predictions - targets) ** 2, torch.zeros_like(predictions))
    if weights is not None:
        squared = squared * weights.to(squared)
    count = labelled.sum().to(torch.int)
    loss_sum = squared.sum()
    return loss_sum, count, _report(loss_sum, count)


ATTRIBUTE_REGRESSION = Task(forward=attribute_scores_forward, loss=attribute_regression_loss, predict=scores_at_index)
