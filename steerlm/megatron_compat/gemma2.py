"""15. Gemma 2's layers, which megatron-core 0.16's local layers lack: norms of each sublayer's output
(`model.post_sublayer_norms`) and soft-capped attention scores and final logits (`model.attn_logit_softcapping`,
`model.final_logit_softcapping`). Gemma 2's attention scale (`model.query_pre_attn_scalar`) is megatron's own
`softmax_scale`.

- Post-sublayer norms (`add_post_norms`): each TransformerLayer gets two norm children, `post_self_attn_layernorm` and
  `post_mlp_layernorm`, and forward hooks on its `self_attention` and `mlp`, which hand `(output, bias)` to the
  layer's bias-dropout-add: the hook adds the bias and hands on `(norm(output), None)`. Relies on that output
  contract, and on megatron's layer `sharded_state_dict` taking every child's parameters (a plain torch module's as
  replicated tensors, as it takes steerlm's input norms). LoRA's hooks on `linear_proj` / `linear_fc2` run inside
  those modules, before the norm, as PEFT's adapters on HF's `o_proj` / `down_proj` do.
- Soft-capped attention scores (`SoftcappedCoreAttention`): item 5's core attention computing the scores explicitly
  (`softcapped_attention`, the lean decoder's too), since no fused kernel caps them. The cap rides on a steerlm
  attribute of the TransformerConfig (`set_softcaps`), which megatron hands to the core attention.
- Soft-capped final logits (`softcap_logits`): a forward hook on GPTModel's `output_layer` (a ColumnParallelLinear
  returning `(logits, bias)`); steerlm's chunked loss caps its own logits (`final_logit_softcap`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from steerlm.megatron_compat import SDPACoreAttention

_ATTENTION_CAP = "steerlm_attn_logit_softcapping"  # TransformerConfig attributes `set_softcaps` sets
_FINAL_CAP = "steerlm_final_logit_softcapping"
POST_NORMS = ("post_self_attn_layernorm", "post_mlp_layernorm")  # a layer's children `add_post_norms` adds
_SUBLAYERS = ("self_attention", "mlp")


def set_softcaps(config: TransformerConfig, attention: Optional[float], final: Optional[float]) -> None:
    """Record the attention scores' and the final logits' caps (None: uncapped) on a TransformerConfig."""
    setattr(config, _ATTENTION_CAP, attention)
    setattr(config, _FINAL_CAP, final)


def attention_softcap(config: TransformerConfig) -> Optional[float]:
    return getattr(config, _ATTENTION_CAP, None)


def final_logit_softcap(config: TransformerConfig) -> Optional[float]:
    return getattr(config, _FINAL_CAP, None)


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """`cap * tanh(x / cap)` in transformers' order of operations; `x` itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    causal: bool,
    scale: Optional[float],
    cap: Optional[float],
) -> torch.Tensor:
    """Attention of `[b, heads, sq, hn]` queries over `[b, groups, sk, hn]` keys and values with soft-capped scores, as
    transformers' eager Gemma 2 computes it: `softcap(q k^T * scale)`, masked, softmax in fp32, back to the query's
    dtype. `mask`: SDPA's (boolean True where allowed, or added); `causal`: the last `sq` of `sk` positions."""
    if key.size(1) != query.size(1):
        repeats = query.size(1) // key.size(1)
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scale = query.size(-1) ** -0.5 if scale is None else scale  # SDPA's default
    scores = softcap(torch.matmul(query, key.transpose(-1, -2)) * scale, cap)
    sq, sk = scores.shape[-2:]
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril(sk - sq)
    if mask is not None:
        low = torch.finfo(scores.dtype).min  # transformers' masked value: a fully masked row stays finite
        scores = scores.masked_fill(~mask, low) if mask.dtype == torch.bool else scores + mask
    probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout_p > 0:
        probabilities = F.dropout(probabilities, dropout_p)
    return torch.matmul(probabilities, value)


class SoftcappedCoreAttention(SDPACoreAttention):
    """`SDPACoreAttention` whose scores are soft-capped (the TransformerConfig's `set_softcaps` cap)."""

    def attend(self, q, k, v, mask: Optional[torch.Tensor], dropout_p: float, causal: bool) -> torch.Tensor:
        cap = attention_softcap(self.config)
        return softcapped_attention(q, k, v, mask, dropout_p, causal, self.softmax_scale, cap)


def add_post_norms(gpt: GPTModel, norm: Callable[[], torch.nn.Module]) -> None:
    """Give every layer of a GPTModel chunk a norm (`norm()`) of its attention's and of its MLP's output."""
    for layer in gpt.decoder.layers:
        for name, sublayer in zip(POST_NORMS, _SUBLAYERS):
            module = getattr(layer, sublayer, None)
            if not isinstance(module, torch.nn.Module):
                raise RuntimeError(
                    f"megatron's TransformerLayer has no {sublayer} module: this megatron-core changed the layer; "
                    "update steerlm.megatron_compat.gemma2"
                )
            setattr(layer, name, norm())
            module.register_forward_hook(_normed(getattr(layer, name)))


def _normed(norm: torch.nn.Module) -> Callable:
    def hook(module: torch.nn.Module, inputs: tuple, output: tuple) -> tuple:
        hidden, bias = output
        return norm(hidden if bias is None else hidden + bias), None

    return hook


def post_norms(layer: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """A layer's norms of its attention's and its MLP's output; None for a layer without (`add_post_norms`)."""
    attention, mlp = (getattr(layer, name, None) for name in POST_NORMS)
    return None if attention is None or mlp is None else (attention, mlp)


def softcap_logits(gpt: GPTModel) -> None:
    """Cap the logits a GPTModel chunk's `output_layer` computes (the TransformerConfig's final cap; nothing on a
    chunk without the output layer or without a cap)."""
    cap = final_logit_softcap(gpt.config)
    layer = getattr(gpt, "output_layer", None)
    if cap is None or layer is None:
        return
    layer.register_forward_hook(lambda module, inputs, output: (softcap(output[0], cap), *output[1:]))
