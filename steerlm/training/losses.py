"""Per-stage losses in megatron's per-token form: (sum over tokens, token count, report).

Returning sums and counts (megatron's `calculate_per_token_loss`) makes the step's loss the mean
over every trained token of the global batch, whatever the micro-batch split, pipeline schedule or
data-parallel size, so layouts agree exactly even when micro-batches hold different token counts.
"""

from __future__ import annotations

import torch


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Language-model loss over the tokens where `loss_mask` is 1.

    `per_token_loss` is megatron GPTModel's `[b, s]` vocab-parallel cross entropy. The report is a
    detached `[sum, count]` pair, summed over micro-batches and ranks by the training step.
    """
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().to(torch.float32)])
    return loss_sum, num_tokens, {"lm_loss": report}
