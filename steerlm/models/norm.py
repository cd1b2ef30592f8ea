"""RMSNorm / LayerNorm for megatron's local layers, usable under sequence parallelism.

megatron-core's torch fallback (WrappedTorchNorm) refuses sequence parallelism without apex/TE. The
only thing SP needs from a norm is that its weights are marked `sequence_parallel`, so that
`finalize_model_grads` sums their gradients over the tensor-parallel group; this module does that
and computes with torch's fused `rms_norm` / `layer_norm`.
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
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            if param is not None:
                # setattr: megatron's marker attribute, which torch's Parameter type does not declare
                setattr(param, "sequence_parallel", config.sequence_parallel)  # noqa: B010

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(hidden, self.shape, self.weight, self.eps)
        return F.layer_norm(hidden, self.shape, self.weight, self.bias, self.eps)
