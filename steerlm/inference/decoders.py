"""The ways the generator runs a model with a KV cache (same interface, same numbers).

Every decoder holds a batch that rows join and leave between steps (continuous batching): `add` prefills
new rows' prompts (of any lengths) and appends them, `step` feeds each row's next token at that row's own
position, `keep` drops the rows that left. Each returns full-vocabulary next-token logits per row; `add` also
gives, for the rows it is asked to score, the logits at every prompt position (`PromptLogits`), from the same
forward pass as the prefill.

- `LeanDecoder`: the model's own weights and norms driven by a short loop of tensor ops, with one cache
  `[rows, query groups, positions, head dim]` as SDPA reads it, each row at its own position (its next key
  and value scattered there, later positions masked out). Megatron's generic forward spends most of a
  decoding step in Python (module dispatch, per-call RoPE recomputation, autograd-function wrappers even
  under inference mode): on 2 CPU cores a step of the 2-layer tiny model took 2.6 ms at batch 32 against HF
  transformers' 2.0 ms; the lean loop does the same math in fewer ops (`bench/generate_throughput.py` gives
  the figures). It covers the Llama, Nemotron and Gemma families (RMSNorm or LayerNorm, zero-centred or not; SwiGLU,
  GeGLU or an ungated activation such as squared ReLU; input embeddings scaled or not; RoPE on all or part of each
  head; linear layers with or without biases,
  Qwen2's on the query, key and value projections alone; Qwen3's norm of each query and key head or none) built with
  megatron's local layers or with Transformer Engine's (whose input norms are fused into `linear_qkv` /
  `linear_fc1`).
- `MegatronDecoder`: megatron-core's own forward with its static inference context, which holds rows at one
  shared position. Rows that join together with prompts of one length form a cohort with its own context;
  a step runs one forward per cohort. Works for every model megatron builds; the reference.
- `GraphedLeanDecoder`: the lean step with static shapes (positions a device tensor, the whole cache
  attended under a mask), recorded as a CUDA graph and replayed per token: on a GPU a small model's step is
  otherwise bound by kernel launches, not by reading the weights. Re-recorded when rows join. CUDA only, TP=1.

Under TP the lean loops keep this rank's heads, make megatron's two reductions per layer themselves
(attention and MLP outputs) and gather the vocabulary-sharded logits. Under PP (`LeanDecoder` only) each stage
runs its own layers with its own part of the cache: the first embeds, each sends its output to the next, and the
last makes the logits and broadcasts them to every stage (`_Stages`), so every rank samples from the same numbers.
Stages run one after the other, as NeMo's and megatron's pipelined generation do: PP is for a model too large
for one node's tensor parallelism, not for speed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.identity_op import IdentityOp

from steerlm.config.inference import PREFILL_TOKENS
from steerlm.inference.adapters import AdapterRows
from steerlm.inference.positions import Continuation, Long, Positions, Rows, Span
from steerlm.megatron_compat import fused_norm_parameters, grouped_sdpa, linear_bias, split_fc1, split_qkv_heads
from steerlm.megatron_compat.gemma2 import (
    attention_softcap,
    final_logit_softcap,
    post_norms,
    softcap,
    softcapped_attention,
)
from steerlm.megatron_compat.scaled_embedding import scaled_lookup
from steerlm.megatron_compat.scaled_rope import ScaledRotaryEmbedding, attention_factor, local_rotary_embedding
from steerlm.models.norm import normalize
from steerlm.runtime.cpu_matmul import linear
from steerlm.runtime.layout import ParallelLayout

if TYPE_CHECKING:
    from steerlm.inference.adapters import AdapterBank


def _padded(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Prompts right-padded (with token 0) into one `[rows, longest]` tensor."""
    tokens = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return tokens


@dataclass(frozen=True)
class PromptLogits:
    """A prefilled prompt's next-token logits at its positions but the last (position i predicts token i + 1),
    made a span of positions at a time: a long prompt's logits over the whole vocabulary at once would take
    positions x vocabulary x 4 bytes. `per_position` [prompt length - 1, ...]: the logits, or the last layer's
    outputs that `project` turns into full-vocabulary logits (under TP a collective: every rank must ask for
    the same spans in the same order)."""

    per_position: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Logits `[≤ size, padded vocab]` of consecutive spans of positions, from the first."""
        for start in range(0, self.per_position.shape[0], size):
            span = self.per_position[start : start + size]
            yield span if self.project is None else self.project(span)


class _Cohort:
    """Rows at one shared position in one megatron static inference context. `every_position`: its forward
    passes make the logits of every position fed, not only of the last (megatron's default in inference)."""

    def __init__(self, rows: int, length: int, every_position: bool = False) -> None:
        self.context = StaticInferenceContext(rows, length)
        self.context.materialize_only_last_token_logits = not every_position
        self.position = 0

    def forward(self, model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, positions, padded vocab]`: of every position fed, or of the last one."""
        start, self.position = self.position, self.position + tokens.shape[1]
        self.context.sequence_len_offset = start
        if start:
            self.context.enable_decode_mode()
        positions = torch.arange(start, self.position, device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None, inference_context=self.context, runtime_gather_output=True)

    def keep(self, rows: list[int]) -> None:
        cache = self.context.key_value_memory_dict
        for layer, (keys, values) in cache.items():
            index = torch.tensor(rows, device=keys.device)
            cache[layer] = (keys.index_select(1, index), values.index_select(1, index))
        self.context.max_batch_size = len(rows)


def _no_adapters(adapters: Sequence[int] | None, decoder: str) -> None:
    if adapters is not None and any(adapters):
        raise ValueError(f"{decoder} runs no LoRA adapters per row; the lean decoder does")


class MegatronDecoder:
    def __init__(self, model: GPTModel, layout: ParallelLayout, length: int) -> None:
        self.model, self.length, self.device = model, length, layout.device
        self.rows: list[tuple[_Cohort, int]] = []  # per batch row: its cohort and its index there

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        length: int,
        scored: Collection[int] = (),
        adapters: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, dict[int, PromptLogits]]:
        """Prefill `prompts` as new rows after the current ones; their next-token logits `[new rows, padded
        vocab]`, and the prompt logits of the rows indexed in `scored`. `length`: positions the new rows may
        reach (prompt and answer). `adapters`: LoRA adapters per row, which only `LeanDecoder` runs."""
        _no_adapters(adapters, "megatron's decoder")
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        logits: list[torch.Tensor | None] = [None] * len(prompts)
        placed: list[tuple[_Cohort, int]] = [None] * len(prompts)  # type: ignore[list-item]
        prompt_logits = {}
        for indices in by_length.values():
            cohort = _Cohort(len(indices), length, every_position=any(i in scored for i in indices))
            out = cohort.forward(self.model, _padded([prompts[i] for i in indices], self.device))
            for local, index in enumerate(indices):
                logits[index], placed[index] = out[local, -1], (cohort, local)
                if index in scored:
                    prompt_logits[index] = PromptLogits(out[local, :-1])
        self.rows += placed
        return torch.stack(logits), prompt_logits  # type: ignore[arg-type]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's next token `[rows]` at its position → next-token logits `[rows, padded vocab]`."""
        out: list[torch.Tensor | None] = [None] * len(self.rows)
        for cohort in dict.fromkeys(c for c, _ in self.rows):
            members = sorted((local, row) for row, (c, local) in enumerate(self.rows) if c is cohort)
            logits = cohort.forward(self.model, tokens[[row for _, row in members]][:, None])[:, -1]
            for k, (_, row) in enumerate(members):
                out[row] = logits[k]
        return torch.stack(out)  # type: ignore[arg-type]

    def keep(self, rows: list[int]) -> None:
        """Keep these batch rows, in this order; the others leave every cohort's cache."""
        kept = [self.rows[row] for row in rows]
        renumbered: dict[_Cohort, dict[int, int]] = {}
        for cohort in dict.fromkeys(c for c, _ in kept):
            locals_ = sorted(local for c, local in kept if c is cohort)
            cohort.keep(locals_)
            renumbered[cohort] = {old: new for new, old in enumerate(locals_)}
        self.rows = [(cohort, renumbered[cohort][local]) for cohort, local in kept]


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
    eps, rms = config.layernorm_epsilon, config.normalization == "RMSNorm"
    return lambda x: normalize(x, weight, bias, eps, rms, config.layernorm_zero_centered_gamma)


def _layer_norms(layer, config) -> tuple[_Norm | None, _Norm | None]:
    return (
        _norm_before(layer.input_layernorm, layer.self_attention.linear_qkv, config),
        _norm_before(layer.pre_mlp_layernorm, layer.mlp.linear_fc1, config),
    )


def _has_module(parent: torch.nn.Module, name: str) -> bool:
    """Whether `parent` has a submodule `name` that computes something (megatron leaves None or an IdentityOp)."""
    return not isinstance(getattr(parent, name, None), (IdentityOp, type(None)))


def lean_unsupported(model: GPTModel) -> str | None:
    """Why `LeanDecoder` cannot run `model` (this rank's pipeline stage of it; None when it can)."""
    config = model.config
    if model.position_embedding_type != "rope" or config.rotary_interleaved:
        return "position embeddings are not (non-interleaved) RoPE"
    if config.apply_residual_connection_post_layernorm or config.fp32_residual_connection:
        return "residual connections are not the plain pre-norm ones"
    for layer in model.decoder.layers:
        if _has_module(layer.self_attention, "q_layernorm") != _has_module(layer.self_attention, "k_layernorm"):
            return "attention normalises its queries or its keys, not both"
        if None in _layer_norms(layer, config):
            return "a layer's input norms are neither its own modules nor fused into linear_qkv / linear_fc1"
    return None


class _Stages:
    """Where this rank's layers sit in the pipeline (PP > 1; at PP = 1 each call is local or nothing): the first
    stage embeds the tokens, each later one receives the hidden states `[rows, positions, hidden]` from the stage
    before (the same TP rank there: megatron's pipeline groups), and the logits the last stage makes are broadcast
    to every stage. Every rank makes the same calls with the same shapes, so the stages need no header."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.first, self.last = layout.is_first_stage, layout.is_last_stage
        self.group = layout.pg_collection.pp if layout.pp > 1 else None
        ranks = [dist.get_global_rank(self.group, i) for i in range(layout.pp)] if self.group is not None else []
        self.previous = ranks[layout.pp_rank - 1] if ranks and not self.first else None
        self.next = ranks[layout.pp_rank + 1] if ranks and not self.last else None
        self.source = ranks[-1] if ranks else None

    def receive(self, empty: torch.Tensor) -> torch.Tensor:
        """`empty` filled with the previous stage's output."""
        dist.recv(empty, src=self.previous, group=self.group)
        return empty

    def send(self, hidden: torch.Tensor) -> None:
        """This stage's output to the next stage (none on the last)."""
        if self.next is not None:
            dist.send(hidden.contiguous(), dst=self.next, group=self.group)

    def share(self, logits: torch.Tensor) -> torch.Tensor:
        """The last stage's `logits` on every stage (the others pass an empty tensor of their shape)."""
        if self.group is not None:
            dist.broadcast(logits, src=self.source, group=self.group)
        return logits


_Cache = list[tuple[torch.Tensor, torch.Tensor]]


def _widened(held: torch.Tensor, more: int) -> torch.Tensor:
    """`held` `[rows, groups, positions, head_dim]` with `more` zeroed positions after its own."""
    return torch.cat((held, held.new_zeros(*held.shape[:2], more, held.shape[3])), 2)


def _joined(held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A layer's cache of the held rows then the `new` ones, over the longer of their position counts (zeros past
    a row's own): one tensor written in place, so a join holds the old and the new cache of one layer at a time,
    not of every layer (a cache copied whole at each join or leave held twice its size at the peak)."""
    rows, positions = held.shape[0], max(held.shape[2], new.shape[2])
    joined = new.new_zeros(rows + new.shape[0], new.shape[1], positions, new.shape[3])
    joined[:rows, :, : held.shape[2]] = held
    joined[rows:, :, : new.shape[2]] = new
    return joined


class LeanDecoder:
    """`adapters`: LoRA adapters rows may use (`add`'s `adapters`, an index per row; 0 or none: the model alone);
    `prefill_tokens`: the most tokens one forward of a prefill computes (`_prefill`)."""

    def __init__(
        self,
        model: GPTModel,
        layout: ParallelLayout,
        length: int,
        adapters: AdapterBank | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        config = model.config
        self.prefill_tokens = prefill_tokens
        self.model = model
        self.adapters = adapters
        self.rows_adapter = torch.zeros(0, dtype=torch.long, device=layout.device)  # per row: its adapter
        self.device = layout.device
        self.group = layout.pg_collection.tp if layout.tp > 1 else None
        self.tp = layout.tp
        self.heads = config.num_attention_heads // layout.tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // layout.tp
        self.head_dim = config.kv_channels
        self.stages = _Stages(layout)
        self.norms: list[tuple[_Norm, _Norm]] = []
        # looked up once, not per step: (layer index, linear) → its bias where it has one; layer index → Qwen3's
        # query and key norms
        self.biases: dict[tuple[int, str], torch.Tensor] = {}
        self.qk_norms: dict[int, tuple[_Norm, _Norm]] = {}
        self.post_norms: dict[int, tuple[_Norm, _Norm]] = {}  # Gemma 2's norms of the attention's, the MLP's output
        self.caps = (attention_softcap(config), final_logit_softcap(config))  # Gemma 2's scores', logits' caps
        for layer in model.decoder.layers:
            input_norm, pre_mlp_norm = _layer_norms(layer, config)
            if input_norm is None or pre_mlp_norm is None:
                raise ValueError(f"LeanDecoder cannot run this model: {lean_unsupported(model)}")
            self.norms.append((input_norm, pre_mlp_norm))
            index, attention, mlp = layer.layer_number - 1, layer.self_attention, layer.mlp
            linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
            for name, module in zip(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), linears):
                bias = linear_bias(module)
                if bias is not None:
                    self.biases[index, name] = bias
            if _has_module(attention, "q_layernorm"):
                self.qk_norms[index] = (attention.q_layernorm, attention.k_layernorm)
            norms = post_norms(layer)
            if norms is not None:
                self.post_norms[index] = norms
        self.dtype = next(model.parameters()).dtype
        self._rotary_tables(model, length)
        self.cache = self._empty(0, 0)
        self.lengths: list[int] = []  # per row: the positions it has filled (its next one)
        self.long_rows = torch.zeros(0, dtype=torch.bool, device=layout.device)  # per row: LongRoPE's long factors
        self.seen: list[list[int]] = []  # LongRoPE: per row within its pretraining length, the tokens it has seen
        self.output_weight = (  # the last stage's: its own copy of tied embeddings under PP
            None
            if not self.stages.last
            else model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights
            else model.output_layer.weight
        )

    def _rotary_tables(self, model: GPTModel, length: int) -> None:
        """RoPE's cos and sin `[length, rotary channels]` as megatron computes them (scaling included), times its
        attention factor; LongRoPE (`long_from`: the pretraining length) has a second pair with the long factors."""
        rope, factor = model.rotary_pos_emb, attention_factor(model.config)
        local = local_rotary_embedding(model)  # Gemma 3's sliding-window layers' (megatron scales them alike)
        self.local_tables = None if local is None else self._table(local(length), factor)
        self.long_from: int | None = None
        if not isinstance(rope, ScaledRotaryEmbedding) or not rope.switches:
            self.cos, self.sin = self._table(rope(length), factor)
            return
        self.long_from = rope.original_max_positions
        self.cos, self.sin = self._table(rope.angles(length, False), factor)
        self.long_cos, self.long_sin = self._table(rope.angles(length, True), factor)

    def _table(self, angles: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        angles = angles[:, 0, 0].float()
        return (angles.cos() * factor).to(self.dtype), (angles.sin() * factor).to(self.dtype)

    def local_rotation(self, index: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sliding-window layers' own cos and sin at positions `index` (Gemma 3's local RoPE); None without."""
        return None if self.local_tables is None else (self.local_tables[0][index], self.local_tables[1][index])

    def long_rope(self, positions: int) -> bool:
        """Whether a sequence of `positions` positions rotates with LongRoPE's long factors: as a forward over the
        whole of it does (transformers' `longrope` update), when it is longer than the pretraining length."""
        return self.long_from is not None and positions > self.long_from

    def rotation(self, index: slice | torch.Tensor, long: Long) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin at positions `index` (a slice, or a tensor whose first dimension is the rows), with
        LongRoPE's long factors where `long` says: every row or none (a bool), or per row (a bool tensor [rows],
        which a CUDA graph's step reads on the device; a slice's tables then get a leading rows dimension)."""
        cos, sin = self.cos[index], self.sin[index]
        if self.long_from is None or long is False:
            return cos, sin
        if long is True:
            return self.long_cos[index], self.long_sin[index]
        assert isinstance(long, torch.Tensor)
        flags = long.view(-1, *[1] * (cos.dim() - (0 if isinstance(index, slice) else 1)))
        return torch.where(flags, self.long_cos[index], cos), torch.where(flags, self.long_sin[index], sin)

    def _lengthen(self, order: Sequence[int], tokens: torch.Tensor) -> None:
        """Before a step feeding `tokens` to the rows `order` (the cache rows, in the order of `tokens`): a row
        whose next position is its pretraining length's is from now on rotated with LongRoPE's long factors, as a
        forward over the whole of it would be, so its cache is computed again with them from the tokens it has seen
        (what transformers' Phi-3 does at that step); the short rows remember this step's tokens."""
        if self.long_from is None:
            return
        rows = [row for row in order if self.lengths[row] == self.long_from]
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            seen = torch.tensor([self.seen[row] for row in rows], dtype=torch.long, device=self.device)
            cache = self._empty(len(rows), self.long_from)
            last = torch.full((len(rows),), self.long_from - 1, device=self.device)
            self._prefill(seen, last, cache, self._adapted(self.rows_adapter.index_select(0, index)), (), long=True)
            for (keys, values), (new_keys, new_values) in zip(self.cache, cache):
                keys[index, :, : self.long_from] = new_keys
                values[index, :, : self.long_from] = new_values
            self.long_rows[index] = True  # in place: a CUDA graph's step reads it
            for row in rows:
                self.seen[row] = []
        for row, token in zip(order, tokens.tolist()):
            if self.lengths[row] < self.long_from:
                self.seen[row].append(token)

    def _empty(self, rows: int, length: int) -> _Cache:
        """A zeroed cache: masked-out positions are multiplied by zero weights, which must meet finite values."""
        parameter = next(self.model.parameters())
        shape = (rows, self.groups, length, self.head_dim)
        return [
            (
                torch.zeros(shape, dtype=parameter.dtype, device=parameter.device),
                torch.zeros(shape, dtype=parameter.dtype, device=parameter.device),
            )
            for _ in self.model.decoder.layers
        ]

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Megatron's non-interleaved RoPE on the first `rotary_percent` of each head's channels (the cos/sin
        width); the rest pass unrotated (Nemotron rotates half of each head)."""
        width = cos.shape[-1]
        if width < x.shape[-1]:
            return torch.cat((LeanDecoder._rope(x[..., :width], cos, sin), x[..., width:]), dim=-1)
        half = width // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _linear(
        self, x: torch.Tensor, module: torch.nn.Module, at: tuple[int, str], rows: AdapterRows | None, parallel: str
    ) -> torch.Tensor:
        """x W^T, plus the update of each adapted row's adapter (`rows`; None: no row has one), plus the bias. A
        `parallel="row"` layer's partial products are summed over the TP ranks before its (whole) bias is added, as
        megatron's RowParallelLinear does; a column-parallel layer's bias is this rank's slice of it."""
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        out = linear(x, weight)
        if rows is not None and self.adapters is not None:
            out = self.adapters.add(out, x, *at, rows)
        if parallel == "row":
            out = self._reduce(out)
        bias = self.biases.get(at)
        return out if bias is None else out + bias

    def _attention(
        self,
        layer,
        x: torch.Tensor,
        positions: Positions,
        cache: tuple[torch.Tensor, torch.Tensor],
        rows: AdapterRows | None = None,
    ) -> torch.Tensor:
        attention, index = layer.self_attention, layer.layer_number - 1
        n = x.shape[1]
        query, key, value = split_qkv_heads(
            self._linear(x, attention.linear_qkv, (index, "linear_qkv"), rows, "column"),
            self.heads,
            self.groups,
            self.head_dim,
        )
        if index in self.qk_norms:  # Qwen3's QK norm: each head's channels, before RoPE
            query_norm, key_norm = self.qk_norms[index]
            query, key = query_norm(query), key_norm(key)
        core = attention.core_attention
        scale, window = getattr(core, "softmax_scale", None), getattr(core, "window", None)
        cos, sin = positions.rotation(windowed=window is not None)
        query, key = self._rope(query, cos, sin), self._rope(key, cos, sin)
        keys, values = cache
        positions.store(keys, key.transpose(1, 2))
        positions.store(values, value.transpose(1, 2))
        visible = (positions.visible(keys), positions.visible(values))
        mask, causal = (positions.mask, positions.causal) if window is None else (positions.windowed(window), False)
        if self.caps[0] is None:
            context = grouped_sdpa(query.transpose(1, 2), *visible, mask, is_causal=causal, scale=scale)
        else:
            context = softcapped_attention(query.transpose(1, 2), *visible, mask, 0.0, causal, scale, self.caps[0])
        context = context.transpose(1, 2).reshape(x.shape[0], n, self.heads * self.head_dim)
        out = self._linear(context, attention.linear_proj, (index, "linear_proj"), rows, "row")
        return self.post_norms[index][0](out) if index in self.post_norms else out

    def _mlp(self, layer, x: torch.Tensor, rows: AdapterRows | None = None) -> torch.Tensor:
        """megatron's MLP: `act(gate) * up` with a gated unit (SwiGLU, GeGLU), else `act(fc1 x)` (Nemotron's squared
        ReLU)."""
        mlp, index, config = layer.mlp, layer.layer_number - 1, self.model.config
        inner = self._linear(x, mlp.linear_fc1, (index, "linear_fc1"), rows, "column")
        if config.gated_linear_unit:
            gate, up = split_fc1(inner, dim=-1)
            inner = config.activation_func(gate) * up
        else:
            inner = config.activation_func(inner)
        out = self._linear(inner, mlp.linear_fc2, (index, "linear_fc2"), rows, "row")
        return self.post_norms[index][1](out) if index in self.post_norms else out

    def _hidden(
        self, tokens: torch.Tensor, positions: Positions, cache: _Cache, rows: AdapterRows | None = None
    ) -> torch.Tensor:
        """The last layer's output at every position of `tokens` [rows, n] → [rows, n, hidden]; `rows`: the rows that
        run an adapter, and theirs (None: every row the model alone). Under PP: this stage's layers' output, which
        it sends on (only the last stage's is the model's)."""
        if self.stages.first:
            hidden = scaled_lookup(self.model, tokens)  # [rows, n, hidden]; TP-reduced; Gemma's scaled
        else:
            shape = (*tokens.shape, self.model.config.hidden_size)
            hidden = self.stages.receive(torch.empty(shape, dtype=self.dtype, device=self.device))
        for layer, (input_norm, pre_mlp_norm), layer_cache in zip(self.model.decoder.layers, self.norms, cache):
            hidden = hidden + self._attention(layer, input_norm(hidden), positions, layer_cache, rows)
            hidden = hidden + self._mlp(layer, pre_mlp_norm(hidden), rows)
        self.stages.send(hidden)
        return hidden

    def shared_prefix_hidden(
        self, prefixes: Sequence[Sequence[int]], owners: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's outputs of sequences that share prefixes, each prefix computed once: sequence i is
        `prefixes[owners[i]] + continuations[i]`. Returns `[prefixes, longest prefix, hidden]` and `[sequences,
        longest continuation, hidden]` (right-padded; padded positions hold unused values). Used to score many
        variants of one context (the Bayes judge's levels); this decoder's own rows are untouched."""
        longest = max((len(p) for p in prefixes), default=0)
        cache = self._empty(len(prefixes), longest)
        hidden = self.cos.new_empty(len(prefixes), 0, self.model.config.hidden_size)
        # each sequence rotates as a forward over the whole of it would (LongRoPE): so does its prefix
        long = [self.long_rope(len(prefixes[o]) + len(c)) for o, c in zip(owners, continuations)]
        prefix_long = dict(zip(owners, long))
        if any(prefix_long[o] != flag for o, flag in zip(owners, long)):
            raise ValueError("sequences sharing a prefix must all be within the pretraining length or all past it")
        if longest:
            padded = _padded([p or [0] for p in prefixes], self.device)
            flags = torch.tensor([prefix_long.get(p, False) for p in range(len(prefixes))], device=self.device)
            hidden = self._hidden(padded, Span(self, padded.shape[1], long=flags), cache)
        n = max((len(c) for c in continuations), default=0)
        owner = torch.tensor(owners, dtype=torch.long, device=self.device)
        if not n:
            return hidden, hidden.new_empty(len(owners), 0, hidden.shape[-1])
        for layer, (keys, values) in enumerate(cache):  # each sequence's prefix, then room for its continuation
            cache[layer] = (_widened(keys.index_select(0, owner), n), _widened(values.index_select(0, owner), n))
        offsets = torch.tensor([len(prefixes[o]) for o in owners], dtype=torch.long, device=self.device)
        tokens = _padded([c or [0] for c in continuations], self.device)
        long_rows = torch.tensor(long, dtype=torch.bool, device=self.device)
        return hidden, self._hidden(tokens, Continuation(self, offsets, longest, tokens.shape[1], long_rows), cache)

    def vocabulary(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of last-layer outputs `[..., hidden]` (the final norm, the output layer, the
        TP shards gathered; under PP made by the last stage and broadcast: a collective of every stage)."""
        if not self.stages.last:
            return self.stages.share(hidden.new_empty(*hidden.shape[:-1], self.model.vocab_size))
        assert self.output_weight is not None
        logits = linear(self.model.decoder.final_layernorm(hidden), self.output_weight)
        if self.group is not None:
            shards = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(shards, logits.contiguous(), group=self.group)
            logits = torch.cat(shards, dim=-1)
        return self.stages.share(softcap(logits, self.caps[1]).contiguous())

    def _logits(
        self, tokens: torch.Tensor, positions: Positions, cache: _Cache, rows: AdapterRows | None = None
    ) -> torch.Tensor:
        """Logits after each row's final token of `tokens` [rows, n]."""
        return self.vocabulary(self._hidden(tokens, positions, cache, rows)[:, -1])

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        length: int,
        scored: Collection[int] = (),
        adapters: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, dict[int, PromptLogits]]:
        """As `MegatronDecoder.add`: one causal prefill of the new rows, right-padded to the longest prompt;
        `adapters`: each new row's adapter (the decoder's `AdapterBank` index; None: none)."""
        held = self.cache[0][0].shape[2]
        size = max(held, length, max(len(p) for p in prompts))
        new = self._empty(len(prompts), size)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        tokens = _padded(prompts, self.device)
        rows = torch.tensor(adapters or [0] * len(prompts), dtype=torch.long, device=self.device)
        if int(rows.max()) > (len(self.adapters.names) if self.adapters else 0):
            raise ValueError(f"adapter {int(rows.max())} is not loaded (this decoder's bank)")
        final, scored_hidden = self._prefill(tokens, last, new, self._adapted(rows), scored, self._long_prompts(last))
        logits = self.vocabulary(final)
        prompt_logits = {
            i: PromptLogits(hidden[: len(prompts[i]) - 1], self.vocabulary) for i, hidden in scored_hidden.items()
        }
        for layer, (held_keys, held_values) in enumerate(self.cache):  # layer by layer: see `_joined`
            keys, values = new.pop(0)
            self.cache[layer] = (_joined(held_keys, keys), _joined(held_values, values))
        self.lengths += [len(p) for p in prompts]
        self.rows_adapter = torch.cat((self.rows_adapter, rows))
        self.long_rows = torch.cat((self.long_rows, self._long_prompts(last)))
        self.seen += [list(p) if self.long_from is not None and len(p) <= self.long_from else [] for p in prompts]
        return logits, prompt_logits

    def _long_prompts(self, last: torch.Tensor) -> torch.Tensor:
        """Per prompt (its last position `last`): whether LongRoPE's long factors rotate it."""
        return last + 1 > self.long_from if self.long_from is not None else torch.zeros_like(last, dtype=torch.bool)

    def _prefill(
        self,
        tokens: torch.Tensor,
        last: torch.Tensor,
        cache: _Cache,
        rows: AdapterRows | None,
        scored: Collection[int],
        long: Long,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Fill `cache` with the right-padded prompts `tokens` [rows, n] in chunks of at most `prefill_tokens`
        tokens (`prefill_tokens // rows` positions of every row, at least one): the transients of a forward grow
        with its tokens, so a long prefill of many rows would otherwise need more memory than the cache it fills.
        Returns the last layer's output at each row's last prompt position (`last` [rows]) and, for the rows in
        `scored`, at every prompt position. `long`: LongRoPE's long factors (`rotation`), for every chunk."""
        count, n = tokens.shape
        chunk = max(1, self.prefill_tokens // count)
        final = torch.empty(count, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in scored}
        for start in range(0, n, chunk):
            hidden = self._hidden(
                tokens[:, start : start + chunk], Span(self, min(chunk, n - start), start, long), cache, rows
            )
            inside = ((last >= start) & (last < start + chunk)).nonzero().flatten()
            final[inside] = hidden[inside, last[inside] - start]
            for i in scored:
                pieces[i].append(hidden[i].clone())  # a view would hold every row's output
            del hidden  # not held through the next chunk's forward
        return final, {i: torch.cat(parts) for i, parts in pieces.items()}

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """As `MegatronDecoder.step`."""
        positions = torch.tensor(self.lengths, device=self.device)
        self._lengthen(range(len(self.lengths)), tokens)
        rows = self._adapted(self.rows_adapter)
        logits = self._logits(tokens[:, None], Rows(self, positions, max(self.lengths) + 1), self.cache, rows)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _adapted(self, rows: torch.Tensor) -> AdapterRows | None:
        """The rows among `rows` (each row's adapter) that run one; None when none does (the model alone, at no
        extra cost)."""
        return AdapterRows.of(rows) if self.adapters is not None else None

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer, (keys, values) in enumerate(self.cache):  # layer by layer, as `add`
            self.cache[layer] = (keys.index_select(0, index), values.index_select(0, index))
        self.lengths = [self.lengths[row] for row in rows]
        self.rows_adapter = self.rows_adapter.index_select(0, index)
        self.long_rows = self.long_rows.index_select(0, index)
        self.seen = [self.seen[row] for row in rows]


class GraphedLeanDecoder(LeanDecoder):
    """`LeanDecoder` whose steps replay a CUDA graph of the static-shape step (prefill stays eager).

    The graph holds the rows it was recorded with: `keep` only narrows which rows' logits are returned (rows
    that left go on computing at their last position, unseen); rows joining (`add`) drop the rows that left
    and the graph is recorded again at the next step. `capture=False` runs the same static step without a
    graph (the arithmetic the graph records, testable on CPU); `capture=True` needs CUDA and TP=1.
    """

    def __init__(
        self,
        model: GPTModel,
        layout: ParallelLayout,
        length: int,
        capture: bool = True,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        if capture and (layout.device.type != "cuda" or layout.tp > 1 or layout.pp > 1):
            raise ValueError(
                "CUDA-graph decoding needs a CUDA device, tensor_model_parallel_size=1 and "
                "pipeline_model_parallel_size=1"
            )
        super().__init__(model, layout, length, prefill_tokens=prefill_tokens)
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.live: list[int] = []  # the cache rows still in the batch, in batch order
        self.tokens = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # static inputs, sized by `add`
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)

    def _static_step(self) -> torch.Tensor:
        return self._logits(self.tokens, Rows(self, self.positions, None), self.cache)

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

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        length: int,
        scored: Collection[int] = (),
        adapters: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, dict[int, PromptLogits]]:
        _no_adapters(adapters, "the CUDA-graph decoder")
        if len(self.live) < len(self.lengths):
            super().keep(self.live)
            self.live = list(range(len(self.lengths)))
        out = super().add(prompts, length, scored)
        self.live = list(range(len(self.lengths)))
        self.tokens = torch.zeros(len(self.lengths), 1, dtype=torch.long, device=self.device)
        self.positions = torch.tensor(self.lengths, device=self.device)
        self.graph = self.output = None
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        live = torch.tensor(self.live, device=self.device)
        self.tokens.index_copy_(0, live, tokens[:, None])
        self.positions.index_copy_(0, live, torch.tensor([self.lengths[r] for r in self.live], device=self.device))
        self._lengthen(self.live, tokens)
        for row in self.live:
            self.lengths[row] += 1
        if not self.capture:
            return self._static_step()[live]
        if self.graph is None or self.output is None:
            self.graph, self.output = self._record()
        self.graph.replay()
        return self.output[live]

    def keep(self, rows: list[int]) -> None:
        self.live = [self.live[row] for row in rows]
