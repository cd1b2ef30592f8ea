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
from steerlm.models.cross_entropy import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
ForwardOnly = Callable[[list[Batch], "Task"], list[torch.Tensor]]


@dataclass(frozen=True)
class Task:
    """`forward(model, batch)` → the model's output; `loss(batch, output)` → (sum, count, report);
    `predict(batch, output)` → per-row outputs collected by forward-only prediction (optional).

    `prepare(microbatches, forward_only)` (optional) runs before each step's schedule, in training and in
    validation, and returns the micro-batches the schedule then sees: for a loss that needs a no-grad pass of
    the current weights first (SteerLM 2.0's baseline). `forward_only(microbatches, task)` is a no-grad
    prediction pass with `task` through the pipeline schedule; its outputs reach every pipeline stage.

    Every report entry is a `[sum, count]` pair, summed over micro-batches and data-parallel ranks; the
    step logs `sum / count` under the entry's name ("loss" is the one the gradient is scaled by).
    """

    forward: Callable[[torch.nn.Module, Batch], torch.Tensor]
    loss: Callable[[Batch, torch.Tensor], LossResult]
    predict: Callable[[Batch, torch.Tensor], torch.Tensor] | None = None
    prepare: Callable[[list[Batch], ForwardOnly], list[Batch]] | None = None
    metrics: tuple[str, ...] = ()  # report entries besides "loss", logged next to it (e.g. "distance")


def _report(loss_sum: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached `[sum, count]`, summed over micro-batches and ranks by the training step."""
    return {"loss": torch.stack([loss_sum.detach().clone(), count.detach().to(torch.float32)])}


def language_model_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Megatron GPTModel's `[b, s]` vocab-parallel cross entropy against `labels`, where `loss_mask` is 1.

    Elsewhere the label becomes IGNORE_INDEX, so the chunked loss (`model.cross_entropy=chunked`) skips the output
    layer there (its loss is 0); megatron's path computes a value there that every loss masks out."""
    labels = torch.where(batch["loss_mask"] > 0, batch["labels"], IGNORE_INDEX)
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=labels)


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


def sequence_log_probs(batch: Batch, per_token_loss: torch.Tensor) -> torch.Tensor:
    """`[b]`: each row's log-probability of its trained tokens (minus the masked token losses' sum)."""
    return -(per_token_loss.float() * batch["loss_mask"].to(torch.float32)).sum(dim=-1)


SEQUENCE_LOG_PROB = Task(forward=language_model_forward, loss=masked_token_loss, predict=sequence_log_probs)


def _group_size(batch: Batch) -> int:
    """Responses per prompt: rows `[g * n, (g + 1) * n)` of a SteerLM 2.0 micro-batch are prompt g's."""
    return int(batch["group_size"][0])


def steerlm2_baseline(microbatches: list[Batch], forward_only: ForwardOnly) -> list[Batch]:
    """SteerLM 2.0's baseline: log b = log_softmax over each prompt's responses of (log pi_theta(y|a,x) -
    log Q'(y|a,x)), from a no-grad pass of the current weights; added as `baseline_log_weight` (`[rows]`,
    float64, on the CPU like the rest of the micro-batch). When pi_theta is Q', b is uniform."""
    log_pi = forward_only(microbatches, SEQUENCE_LOG_PROB)
    prepared = []
    for batch, log_probs in zip(microbatches, log_pi):
        n = _group_size(batch)
        scores = log_probs.detach().to("cpu", torch.float64) - batch["log_q"].to(torch.float64)
        prepared.append({**batch, "baseline_log_weight": torch.log_softmax(scores.view(-1, n), dim=-1).view(-1)})
    return prepared


def steerlm2_loss(batch: Batch, per_token_loss: torch.Tensor) -> LossResult:
    """SteerLM 2.0 (NeMo-Aligner 0.7's GPTSteerLMModel): per prompt, sum_i (w_i - b_i) x NLL(y_i) over the
    mean trained-token count of its responses; counted once per prompt.

    `target_weight` w is fixed by the data; b = exp(`baseline_log_weight`) comes from `steerlm2_baseline`
    (no gradient), so the gradient is that of the listwise cross entropy -sum_i w_i log softmax_i(log pi_theta -
    log Q') divided by the token count. The report adds `distance`: KL(w || b) per prompt. Rows are
    `steerlm.data.steerlm2.group_batch`'s: a prompt's n responses in consecutive rows of one micro-batch.
    """
    mask = batch["loss_mask"].to(torch.float32)
    nll = (per_token_loss.float() * mask).sum(dim=-1)
    n = _group_size(batch)
    target = batch["target_weight"].to(torch.float64)
    log_baseline = batch["baseline_log_weight"].to(torch.float64)
    advantage = (target - log_baseline.exp()).to(nll)
    tokens = mask.sum(dim=-1).view(-1, n).mean(dim=-1)
    loss_sum = ((advantage * nll).view(-1, n).sum(dim=-1) / tokens.clamp(min=1.0)).sum()
    groups = (tokens > 0).sum().to(torch.int)  # a blank group (filling a validation batch) counts for nothing
    cross = torch.where(target > 0, target * log_baseline, torch.zeros_like(target))
    distance = (torch.special.xlogy(target, target) - cross).sum().to(nll)
    return loss_sum, groups, {**_report(loss_sum, groups), "distance": torch.stack([distance, groups.float()])}


STEERLM2 = Task(forward=language_model_forward, loss=steerlm2_loss, prepare=steerlm2_baseline, metrics=("distance",))
