"""Core attention through `torch.nn.functional.scaled_dot_product_attention`.

Used with megatron-core's local layers (no Transformer Engine): SDPA picks flash / memory-efficient
kernels on GPU and a fused CPU kernel otherwise, and handles grouped-query attention without
materialising repeated key/value heads. Drop-in for megatron's DotProductAttention (same
constructor and forward contract).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """query [sq, b, np, hn], key/value [sk, b, ng, hn] → context [sq, b, np * hn] (per TP rank)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention takes neither packed_seq_params nor attention_bias; "
                "use model.transformer_impl=transformer_engine for those")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        # Megatron masks are True where attention is forbidden; SDPA's boolean masks are True where allowed.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        causal = sdpa_mask is None and mask_type == AttnMaskType.causal
        dropout_p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1),
            )
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)
