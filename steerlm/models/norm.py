"""RMSNorm / LayerNorm for megatron's local layers, usable under sequence parallelism.

megatron-core's torch fallback (WrappedTorchNorm) refuses sequence parallelism without apex/TE. The
only thing SP needs from a norm is that its weights are marked `sequence_parallel`, so that
`finalize_model_grads` sums their gradients over the tensor-parallel group; this module does that
and computes with torch's fused `rms_norm` / `layer_norm`.

With `config.layernorm_zero_centered_gamma` (NeMo's `layernorm1p`, Nemotron's norms) the weight is stored centred on
zero and the norm scales by `1 + weight`, as Transformer Engine's `zero_centered_gamma` and HF's `NemotronLayerNorm1P`
do; megatron's torch fallback refuses that flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_ignored) -> None:
        super().__init__()
        self.shape = (hidden_size,)
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = config.layernorm_zero_centered_gamma
        fill = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(fill(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            if param is not None:
                # setattr: megatron's marker attribute, which torch's Parameter type does not declare
                setattr(param, "sequence_parallel", config.sequence_parallel)  # noqa: B010

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return normalize(hidden, self.weight, self.bias, self.eps, self.rms, self.zero_centered)


def normalize(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    zero_centered: bool,
) -> torch.Tensor:
    """RMSNorm (`rms`) or LayerNorm of `hidden`'s last dimension, scaled by `weight` (by `1 + weight` when
    `zero_centered`): the one formula the training layers and the lean decoder's fused-norm path share."""
    scale = weight + 1 if zero_centered else weight
    shape = (weight.shape[0],)
    if rms:
        return F.rms_norm(hidden, shape, scale, eps)
    return F.layer_norm(hidden, shape, scale, bias, eps)
