"""The ways the generator runs a model with a KV cache (same interface, same numbers).

- `MegatronDecoder`: megatron-core's own forward with its static inference context (its attention
  layers store keys/values per layer). Works for every model megatron builds; the reference.
- `LeanDecoder`: the same modules' weights and norms driven by a short loop of tensor ops, with the
  cache laid out `[rows, query groups, positions, head dim]` as SDPA reads it. Megatron's generic
  forward spends most of a decoding step in Python (module dispatch, per-call RoPE recomputation,
  autograd-function wrappers even under inference mode): on 2 CPU cores a step of the 2-layer tiny model
  took 2.6 ms at batch 32 against HF transformers' 2.0 ms; the lean loop does the same math in fewer ops
  (`bench/generate_throughput.py` gives the figures). It covers the Llama family (RMSNorm or
  LayerNorm, SwiGLU, RoPE, no biases, no QK norm) built with megatron's local layers or with Transformer
  Engine's (whose input norms are fused into `linear_qkv` / `linear_fc1`); anything else uses
  `MegatronDecoder`.
- `GraphedLeanDecoder`: the lean loop's decode step with static shapes (the position a device tensor, the
  whole cache attended under a mask), recorded once as a CUDA graph and replayed per token: on a GPU a
  small model's step is otherwise bound by kernel launches, not by reading the weights. CUDA only, TP=1.

Under TP the lean loops keep this rank's heads, make megatron's two reductions per layer themselves
(attention and MLP outputs) and gather the vocabulary-sharded logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.identity_op import IdentityOp

from steerlm.megatron_compat import fused_norm_parameters, linear_bias, split_fc1, split_qkv_heads
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


_Norm = Callable[[torch.Tensor], torch.Tensor]


def _norm_before(module: torch.nn.Module, linear: torch.nn.Module, config) -> _Norm | None:
    """The norm a layer applies before `linear`: its own module (megatron's local layers), or the norm
    Transformer Engine fuses into `linear` (the module is then an IdentityOp); None if neither or both."""
    fused = fused_norm_parameters(linear)
    if fused is None:
        return None if isinstance(module, IdentityOp) else module
    if not isinstance(module, IdentityOp):
        return None
    weight, bias = fused
    shape, eps = (weight.shape[0],), config.layernorm_epsilon
    if config.normalization == "RMSNorm":
        return lambda x: F.rms_norm(x, shape, weight, eps)
    return lambda x: F.layer_norm(x, shape, weight, bias, eps)


def _layer_norms(layer, config) -> tuple[_Norm | None, _Norm | None]:
    return (
        _norm_before(layer.input_layernorm, layer.self_attention.linear_qkv, config),
        _norm_before(layer.pre_mlp_layernorm, layer.mlp.linear_fc1, config),
    )


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
    if config.layernorm_zero_centered_gamma:
        return "norms use zero-centred gamma"
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
        if any(linear_bias(m) is not None for m in linears):
            return "linear layers have biases"
        if not all(
            isinstance(getattr(attention, n, None), (IdentityOp, type(None))) for n in ("q_layernorm", "k_layernorm")
        ):
            return "attention has QK normalisation"
        if None in _layer_norms(layer, config):
            return "a layer's input norms are neither its own modules nor fused into linear_qkv / linear_fc1"
    return None


class _Span:
    """Positions `start … start+n-1` as Python numbers (eager decoding): the cache is written and read in
    slices, and a prefill's attention is causal."""

    def __init__(self, decoder: LeanDecoder, start: int, n: int) -> None:
        self.start, self.end = start, start + n
        self.cos, self.sin = decoder.cos[start : self.end, None], decoder.sin[start : self.end, None]
        self.mask, self.causal = None, n > 1

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        cache[:, :, self.start : self.end] = new

    def visible(self, cache: torch.Tensor) -> torch.Tensor:
        return cache[:, :, : self.end]


class _DevicePosition:
    """One position held in a 0-dim device tensor (static shapes, for CUDA graphs): the cache is written by
    index and read whole, positions after this one masked out."""

    def __init__(self, decoder: LeanDecoder, position: torch.Tensor) -> None:
        self.index = position.view(1)
        self.cos = decoder.cos.index_select(0, self.index)[:, None]
        self.sin = decoder.sin.index_select(0, self.index)[:, None]
        self.mask = (torch.arange(decoder.cos.shape[0], device=position.device) <= position)[None]  # [1, length]
        self.causal = False

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        cache.index_copy_(2, self.index, new)

    def visible(self, cache: torch.Tensor) -> torch.Tensor:
        return cache


class LeanDecoder:
    def __init__(self, model: GPTModel, layout: ParallelLayout, rows: int, length: int) -> None:
        config = model.config
        self.model = model
        self.group = layout.pg_collection.tp if layout.tp > 1 else None
        self.tp = layout.tp
        self.heads = config.num_attention_heads // layout.tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // layout.tp
        self.head_dim = config.kv_channels
        self.norms: list[tuple[_Norm, _Norm]] = []
        for layer in model.decoder.layers:
            input_norm, pre_mlp_norm = _layer_norms(layer, config)
            if input_norm is None or pre_mlp_norm is None:
                raise ValueError(f"LeanDecoder cannot run this model: {lean_unsupported(model)}")
            self.norms.append((input_norm, pre_mlp_norm))
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

    @staticmethod
    def _rope(x: torch.Tensor, positions: _Span | _DevicePosition) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * positions.cos + rotated * positions.sin

    def _attention(self, layer, x: torch.Tensor, positions: _Span | _DevicePosition, index: int) -> torch.Tensor:
        attention = layer.self_attention
        rows, n = x.shape[:2]
        query, key, value = split_qkv_heads(
            F.linear(x, attention.linear_qkv.weight), self.heads, self.groups, self.head_dim
        )
        query, key = self._rope(query, positions), self._rope(key, positions)
        keys, values = self.cache[index]
        positions.store(keys, key.transpose(1, 2))
        positions.store(values, value.transpose(1, 2))
        context = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            positions.visible(keys),
            positions.visible(values),
            attn_mask=positions.mask,
            is_causal=positions.causal,
            scale=getattr(attention.core_attention, "softmax_scale", None),
            enable_gqa=self.heads != self.groups,
        )
        context = context.transpose(1, 2).reshape(rows, n, self.heads * self.head_dim)
        return self._reduce(F.linear(context, attention.linear_proj.weight))

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = split_fc1(F.linear(x, layer.mlp.linear_fc1.weight), dim=-1)
        return self._reduce(F.linear(F.silu(gate) * up, layer.mlp.linear_fc2.weight))

    def _logits(self, tokens: torch.Tensor, positions: _Span | _DevicePosition) -> torch.Tensor:
        hidden = self.model.embedding.word_embeddings(tokens)  # [rows, n, hidden]; TP-reduced
        for index, (layer, (input_norm, pre_mlp_norm)) in enumerate(zip(self.model.decoder.layers, self.norms)):
            hidden = hidden + self._attention(layer, input_norm(hidden), positions, index)
            hidden = hidden + self._mlp(layer, pre_mlp_norm(hidden))
        last = self.model.decoder.final_layernorm(hidden[:, -1])
        logits = F.linear(last, self.output_weight)
        if self.group is None:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp)]
        dist.all_gather(shards, logits.contiguous(), group=self.group)
        return torch.cat(shards, dim=-1)

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """As `MegatronDecoder.forward`; a chunk of several positions must start at 0 (prefill)."""
        if tokens.shape[1] > 1 and start:
            raise ValueError("LeanDecoder feeds several positions only as the first (prefill) pass")
        return self._logits(tokens, _Span(self, start, tokens.shape[1]))

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.cache[0][0].device)
        self.cache = [(keys.index_select(0, index), values.index_select(0, index)) for keys, values in self.cache]


class GraphedLeanDecoder(LeanDecoder):
    """`LeanDecoder` whose one-position steps replay a CUDA graph of the static-shape step (prefill stays eager).

    The graph holds the batch it was recorded with: `keep` only narrows which rows' logits are returned
    (finished rows go on computing unseen), so it is recorded once per generation. The cache starts zeroed, so
    the masked-out positions the static step reads are finite. `capture=False` runs the same static step
    without a graph (the arithmetic the graph records, testable on CPU); `capture=True` needs CUDA and TP=1.
    """

    def __init__(self, model: GPTModel, layout: ParallelLayout, rows: int, length: int, capture: bool = True) -> None:
        if capture and (layout.device.type != "cuda" or layout.tp > 1):
            raise ValueError("CUDA-graph decoding needs a CUDA device and tensor_model_parallel_size=1")
        super().__init__(model, layout, rows, length)
        for keys, values in self.cache:
            keys.zero_()
            values.zero_()
        device = self.cache[0][0].device
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.live = torch.arange(rows, device=device)
        self.output: torch.Tensor | None = None

    def _static_step(self) -> torch.Tensor:
        return self._logits(self.tokens, _DevicePosition(self, self.position))

    def _record(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (allocator and kernels settle), then record; both write this step's key
        and value, which the replay writes again unchanged. Returns the graph and the output tensor it fills."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._static_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._static_step()
        return graph, output

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if tokens.shape[1] > 1:
            return super().forward(tokens, start)
        self.tokens.index_copy_(0, self.live, tokens)
        self.position.fill_(start)
        if not self.capture:
            return self._static_step()[self.live]
        if self.graph is None or self.output is None:
            self.graph, self.output = self._record()
        self.graph.replay()
        return self.output[self.live]

    def keep(self, rows: list[int]) -> None:
        self.live = self.live[torch.tensor(rows, device=self.live.device)]
