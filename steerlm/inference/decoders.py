"""The two ways the generator runs a model with a KV cache (same interface, same numbers).

- `MegatronDecoder`: megatron-core's own forward with its static inference context (its attention
  layers store keys/values per layer). Works for every model megatron builds; the reference.
- `LeanDecoder`: the same modules' weights and norms driven by a short loop of tensor ops, with the
  cache laid out `[rows, query groups, positions, head dim]` as SDPA reads it. Megatron's generic
  forward spends most of a decoding step in Python (module dispatch, per-call RoPE recomputation,
  autograd-function wrappers even under inference mode): on 2 CPU cores a step of the 2-layer tiny model
  took 2.6 ms at batch 32 against HF transformers' 2.0 ms; the lean loop does the same math in fewer ops
  (`bench/generate_throughput.py` gives the figures). It covers the Llama family (RMSNorm or
  LayerNorm, SwiGLU, RoPE, no biases, no QK norm); anything else uses `MegatronDecoder`.

Under TP both keep this rank's heads; the lean loop makes megatron's two reductions per layer itself
(attention and MLP outputs) and gathers the vocabulary-sharded logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.identity_op import IdentityOp

from steerlm.megatron_compat import split_fc1, split_qkv_heads
from steerlm.runtime.layout import ParallelLayout


class MegatronDecoder:
    def __init__(self, model: GPTModel, layout: ParallelLayout, rows: int, length: int) -> None:
        self.model = model
        self.context = StaticInferenceContext(rows, length)

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Full-vocabulary logits `[rows, padded vocab]` after `tokens` [rows, n] at positions start…start+n-1."""
        self.context.sequence_len_offset = start
        if start:
            self.context.enable_decode_mode()
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = self.model(tokens, positions, None, inference_context=self.context, runtime_gather_output=True)
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Drop the other rows from every layer's cache."""
        cache = self.context.key_value_memory_dict
        for layer, (keys, values) in cache.items():
            index = torch.tensor(rows, device=keys.device)
            cache[layer] = (keys.index_select(1, index), values.index_select(1, index))
        self.context.max_batch_size = len(rows)


def lean_unsupported(model: GPTModel) -> str | None:
    """Why `LeanDecoder` cannot run `model` (None when it can)."""
    config = model.config
    if not (model.pre_process and model.post_process):
        return "the model is split across pipeline stages"
    if model.position_embedding_type != "rope" or config.rotary_interleaved:
        return "position embeddings are not (non-interleaved) RoPE"
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        return "the MLP is not SwiGLU"
    if model.rotary_pos_emb.inv_freq.numel() * 2 != config.kv_channels:
        return "RoPE covers only part of each head (rotary_percent < 1)"
    if config.apply_residual_connection_post_layernorm or config.fp32_residual_connection:
        return "residual connections are not the plain pre-norm ones"
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        if any(
            m.bias is not None for m in (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
        ):
            return "linear layers have biases"
        if not all(
            isinstance(getattr(attention, n, None), (IdentityOp, type(None))) for n in ("q_layernorm", "k_layernorm")
        ):
            return "attention has QK normalisation"
    return None


class LeanDecoder:
    def __init__(self, model: GPTModel, layout: ParallelLayout, rows: int, length: int) -> None:
        config = model.config
        self.model = model
        self.group = layout.pg_collection.tp if layout.tp > 1 else None
        self.tp = layout.tp
        self.heads = config.num_attention_heads // layout.tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // layout.tp
        self.head_dim = config.kv_channels
        parameter = next(model.parameters())
        freqs = model.rotary_pos_emb(length)[:, 0, 0].float()  # [length, head_dim]: megatron's RoPE (scaling included)
        self.cos, self.sin = freqs.cos().to(parameter.dtype), freqs.sin().to(parameter.dtype)
        shape = (rows, self.groups, length, self.head_dim)
        self.cache = [
            (
                torch.empty(shape, dtype=parameter.dtype, device=parameter.device),
                torch.empty(shape, dtype=parameter.dtype, device=parameter.device),
            )
            for _ in model.decoder.layers
        ]
        self.output_weight = (
            model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights
            else model.output_layer.weight
        )

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        cos, sin = self.cos[start : start + x.shape[1], None], self.sin[start : start + x.shape[1], None]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, layer, x: torch.Tensor, start: int, index: int) -> torch.Tensor:
        attention = layer.self_attention
        rows, n = x.shape[:2]
        query, key, value = split_qkv_heads(
            F.linear(x, attention.linear_qkv.weight), self.heads, self.groups, self.head_dim
        )
        query, key = self._rope(query, start), self._rope(key, start)
        keys, values = self.cache[index]
        keys[:, :, start : start + n] = key.transpose(1, 2)
        values[:, :, start : start + n] = value.transpose(1, 2)
        context = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            keys[:, :, : start + n],
            values[:, :, : start + n],
            is_causal=n > 1,
            scale=getattr(attention.core_attention, "softmax_scale", None),
            enable_gqa=self.heads != self.groups,
        )
        context = context.transpose(1, 2).reshape(rows, n, self.heads * self.head_dim)
        return self._reduce(F.linear(context, attention.linear_proj.weight))

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = split_fc1(F.linear(x, layer.mlp.linear_fc1.weight), dim=-1)
        return self._reduce(F.linear(F.silu(gate) * up, layer.mlp.linear_fc2.weight))

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """As `MegatronDecoder.forward`; a chunk of several positions must start at 0 (prefill)."""
        if tokens.shape[1] > 1 and start:
            raise ValueError("LeanDecoder feeds several positions only as the first (prefill) pass")
        hidden = self.model.embedding.word_embeddings(tokens)  # [rows, n, hidden]; TP-reduced
        for index, layer in enumerate(self.model.decoder.layers):
            hidden = hidden + self._attention(layer, layer.input_layernorm(hidden), start, index)
            hidden = hidden + self._mlp(layer, layer.pre_mlp_layernorm(hidden))
        last = self.model.decoder.final_layernorm(hidden[:, -1])
        logits = F.linear(last, self.output_weight)
        if self.group is None:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp)]
        dist.all_gather(shards, logits.contiguous(), group=self.group)
        return torch.cat(shards, dim=-1)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.cache[0][0].device)
        self.cache = [(keys.index_select(0, index), values.index_select(0, index)) for keys, values in self.cache]
