"""Language-model loss straight from the last hidden states, a chunk of tokens at a time.

Megatron's path computes the output layer's logits for every token (`[s, b, vocab/tp]` in the compute dtype),
then `vocab_parallel_cross_entropy` upcasts them to fp32 and keeps the fp32 softmax for the backward: with a
128k vocabulary and 4096 tokens that is 1 GiB of bf16 logits plus 2 GiB of fp32 softmax per micro-batch. Here
the fp32 logits exist for one chunk of tokens at a time; what the backward needs is kept as `softmax - one_hot`
in the compute dtype (the tensor megatron's backward casts to the compute dtype anyway before the output
layer's matrix products), so the loss and the gradients are megatron's, in half the memory and without the
full-vocabulary fp32 passes. Vocabulary-parallel: each tensor-parallel rank holds `vocab/tp` rows of the
output weight; the max, the sum of exponentials and the target logit are all-reduced across the group, as
megatron does.

Positions whose label is negative (`IGNORE_INDEX`: the prompt, the padding — everything `loss_mask` leaves out)
are not computed at all: their loss is 0 and neither the output layer nor the softmax sees them. In SFT that is
most of a batch (the system prompt, the user turns and the attribute line: 61 % of the synthetic world's SFT
positions), and the output layer is a large share of a small model's matrix products (46 % in the `small`
preset, 32k vocabulary), so a step skips that share of the head's work; megatron and HF transformers compute
logits for every position and mask the loss afterwards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

FP32_CHUNK_ELEMENTS = 1 << 26  # fp32 logits of one chunk: at most 256 MiB
IGNORE_INDEX = -100  # a label that trains nothing (any negative label does); torch's and HF's convention


def tokens_per_chunk(vocab_shard: int) -> int:
    return max(1, FP32_CHUNK_ELEMENTS // vocab_shard)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """hidden `[n, h]`, weight `[vocab/tp, h]`, targets `[n]` (global ids) → per-token loss `[n]` in fp32; with a
    `cap`, of the logits `cap * tanh(logits / cap)` (Gemma 2's final soft-capping)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, chunk, cap):
        shard = weight.shape[0]
        first = shard * (dist.get_rank(group) if group is not None else 0)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # One fp32 chunk (every CPU run of a small vocabulary): the softmax is the saved gradient itself, which
        # spares a copy of the whole [tokens, vocab] block (5 % of the `small` preset's step on an Intel Xeon).
        single = hidden.shape[0] <= chunk and hidden.dtype == torch.float32
        gradient = None if single else torch.empty(hidden.shape[0], shard, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = torch.matmul(hidden[start:end], weight.t()).float()
            slope = None
            if cap is not None:
                logits = torch.tanh(logits.div_(cap))
                slope = 1 - logits * logits  # the capped logit's derivative by the logit
                logits.mul_(cap)
            logits -= _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)[:, None]
            local = targets[start:end] - first
            owned = (local >= 0) & (local < shard)
            local = torch.where(owned, local, torch.zeros_like(local))[:, None]
            target_logit = torch.where(owned, logits.gather(1, local).squeeze(1), torch.zeros_like(losses[start:end]))
            _all_reduce(target_logit, dist.ReduceOp.SUM, group)
            softmax = logits.exp_()
            total = _all_reduce(softmax.sum(dim=-1), dist.ReduceOp.SUM, group)
            losses[start:end] = total.log() - target_logit
            softmax /= total[:, None]
            softmax.scatter_add_(1, local, -owned.to(softmax.dtype)[:, None])
            if slope is not None:
                softmax.mul_(slope)
            if gradient is None:
                gradient = softmax
            else:
                gradient[start:end] = softmax
        if gradient is None:  # no token kept
            gradient = hidden.new_empty(0, shard)
        ctx.save_for_backward(hidden, weight, gradient)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, gradient = ctx.saved_tensors
        gradient.mul_(grad_losses.to(gradient.dtype)[:, None])  # the saved tensor is used once
        return gradient.matmul(weight), gradient.t().matmul(hidden), None, None, None, None


def chunked_language_model_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    sequence_parallel: bool,
    cap: float | None = None,
) -> torch.Tensor:
    """Per-token cross entropy `[b, s]` (fp32) of the output layer `weight` (`[vocab/tp, h]`, this rank's rows)
    on the last hidden states `[s, b, h]` (sequence-parallel split when that is on), against `labels` `[b, s]`;
    0, with no gradient, where a label is negative. `cap`: the logits soft-capped first (Gemma 2's).

    Megatron's column-parallel output layer's communication is kept: the sequence-parallel all-gather (whose
    backward reduce-scatters), or the identity whose backward all-reduces the hidden states' gradient.
    """
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    if group is not None:
        if sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=group)
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    s, b, h = hidden_states.shape
    targets = labels.transpose(0, 1).reshape(-1)
    hidden = hidden_states.reshape(s * b, h)
    # Labels are the same on every rank of the group, so every rank keeps the same rows and makes the same
    # all-reduces (none when no row is kept).
    kept = (targets >= 0).nonzero().squeeze(1)
    skipping = kept.numel() < s * b
    if skipping:
        hidden, targets = hidden.index_select(0, kept), targets.index_select(0, kept)
    chunk = tokens_per_chunk(weight.shape[0])
    losses = _ChunkedVocabParallelCrossEntropy.apply(hidden, weight, targets, group, chunk, cap)
    if skipping:
        losses = losses.new_zeros(s * b).index_copy(0, kept, losses)
    return losses.view(s, b).transpose(0, 1).contiguous()
