"""Low-rank adapters (LoRA) on megatron-core's tensor-parallel linear layers.

A targeted linear layer keeps its frozen weight W and learns two small matrices, A (rank x in) and B
(out x rank), so that it computes x W^T + scale * (x A^T) B^T with scale = alpha / rank; B starts at zero, so
the adapted model starts as the base model. The adapters are parameters of the linear layer itself
(`<layer>.lora_a`, `<layer>.lora_b`), so global names, checkpoints, parity helpers and the optimizer treat
them like any other parameter; a forward hook adds the low-rank path to the layer's output.

Tensor parallelism follows the layer's own split, so no rank ever holds a full weight-sized product:

- column-parallel (`linear_qkv`, `linear_fc1`; output rows split): A is replicated, B is split along its rows
  like W (SwiGLU's fc1 with the same [gate_r; up_r] stride). The rank-r activation x A^T is the same on every
  rank; its gradient is summed over the TP group (each rank's B sees only its rows), so A's gradient is the
  same everywhere. Under sequence parallelism the layer's input is first gathered over the sequence.
- row-parallel (`linear_proj`, `linear_fc2`; input columns split): A is split along its columns like W, the
  partial products x_r A_r^T are summed over the TP group (reduce-scattered over the sequence under sequence
  parallelism, where B is marked `sequence_parallel` so megatron sums its gradient), and B is replicated.

Dropout (`lora.dropout`, training only) drops the adapters' input as PEFT's and NeMo's do, with a mask drawn at the
input's full width from the default RNG, which every tensor-parallel rank draws alike (`build_model_chunks` leaves
it as seeded): a column layer's (whole) input takes it all, a row layer's slice its own columns, so TP=2 drops
what one rank drops.

Merging (`merge`) adds scale * B A to each rank's slice of W, with no communication: B_r A for a column
layer, B A_r for a row layer. A checkpoint with adapters records them in its metadata
(`steerlm.checkpoint.sharded`), which merges them whenever the weights are read without training them on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from steerlm.config.lora import LoraConfig
from steerlm.megatron_compat import extra_linear_sharded_state
from steerlm.models.attribute import is_head
from steerlm.models.sharding import shard

A = "lora_a"
B = "lora_b"
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
_ATTENTION = ("linear_qkv", "linear_proj")
CONFIG_ATTRIBUTE = "steerlm_lora"  # on a GPTModel chunk: the LoraConfig of its attached adapters
_ADAPTED = "steerlm_lora_adapted"  # on an adapted linear layer: its Adapted record


def is_adapter(name: str) -> bool:
    """Whether a parameter's (global) name is an adapter matrix."""
    return name.endswith(f".{A}") or name.endswith(f".{B}")


def trained(name: str) -> bool:
    """Whether a LoRA run trains the parameter: an adapter matrix, or an APM's attribute head (which no base model
    has). The rest is frozen, and an adapters-only checkpoint leaves it to the base."""
    return is_adapter(name) or is_head(name)


@dataclass
class Adapted:
    """One linear layer with adapters: what `detach` takes away and `reattach` puts back."""

    linear: Any  # a megatron ColumnParallelLinear / RowParallelLinear
    column: bool
    scale: float
    dropout: float
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    hook: Any


def target_linears(chunk: torch.nn.Module, targets: list[str]) -> Iterator[tuple[str, Any]]:
    """(global name, layer) of every targeted linear layer of this pipeline stage's chunk."""
    for layer in cast(Any, chunk).decoder.layers:
        for target in targets:
            parent = "self_attention" if target in _ATTENTION else "mlp"
            yield f"decoder.layers.{layer.layer_number - 1}.{parent}.{target}", getattr(getattr(layer, parent), target)


def config_of(chunk: torch.nn.Module) -> LoraConfig | None:
    """The LoraConfig of the adapters attached to `chunk` (None: none)."""
    return getattr(chunk, CONFIG_ATTRIBUTE, None)


def _tp(linear: Any) -> tuple[dist.ProcessGroup, int, int]:
    group = cast(dist.ProcessGroup, linear.tp_group)
    return group, dist.get_rank(group), dist.get_world_size(group)


def _fresh_a(name: str, rank: int, full_in: int, seed: int) -> torch.Tensor:
    """A at its full shape, from a generator seeded by the run's seed and the layer's global name, so every
    layout starts from the same adapters (PEFT's Kaiming-uniform A; B is zero)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(rank, full_in)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
    return full


def _attach_one(name: str, linear: Any, cfg: LoraConfig, seed: int) -> None:
    column = name.rsplit(".", 1)[1] in COLUMN_PARALLEL
    weight = cast(torch.Tensor, linear.weight)
    out_local, in_local = weight.shape
    _, tp_rank, tp = _tp(linear)
    a = torch.nn.Parameter(torch.empty(cfg.rank, in_local, dtype=weight.dtype, device=weight.device))
    b = torch.nn.Parameter(torch.zeros(out_local, cfg.rank, dtype=weight.dtype, device=weight.device))
    sharded, replicated = (b, a) if column else (a, b)
    sharded.tensor_model_parallel = True  # type: ignore[attr-defined]
    sharded.partition_dim = 0 if column else 1  # type: ignore[attr-defined]
    sharded.partition_stride = getattr(weight, "partition_stride", 1) if column else 1  # type: ignore[attr-defined]
    replicated.tensor_model_parallel = False  # type: ignore[attr-defined]
    if not column and linear.config.sequence_parallel:
        b.sequence_parallel = True  # type: ignore[attr-defined]  # megatron sums its gradient over the TP group
    full_in = in_local if column else in_local * tp
    with torch.no_grad():
        a.copy_(shard(_fresh_a(name, cfg.rank, full_in, seed), a, tp_rank, tp))
    linear.register_parameter(A, a)
    linear.register_parameter(B, b)
    _install(Adapted(linear, column, cfg.scale, cfg.dropout, a, b, hook=None))


def _install(adapted: Adapted) -> None:
    """The forward hook and the checkpoint layout of `adapted`'s matrices."""
    linear = adapted.linear
    setattr(linear, _ADAPTED, adapted)
    adapted.hook = linear.register_forward_hook(lambda module, args, output: _add_low_rank(adapted, args[0], output))
    linear.sharded_state_dict = lambda prefix="", sharded_offsets=(), metadata=None: _sharded_state_dict(
        adapted, prefix, sharded_offsets, metadata
    )


def _dropped(adapted: Adapted, x: torch.Tensor) -> torch.Tensor:
    """`x` after dropout (as torch's CPU dropout computes it: x * (bernoulli(1 - p) / (1 - p))), the mask drawn at
    the layer's full input width so that a row layer's TP slice is dropped as one rank drops those columns."""
    p = adapted.dropout
    if not p or not adapted.linear.training:
        return x
    width, offset = x.shape[-1], 0
    if not adapted.column:
        _, tp_rank, tp = _tp(adapted.linear)
        width, offset = width * tp, tp_rank * width
    keep = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    # backward keeps the mask: only this rank's columns (a copy, so the full-width draw is freed)
    mine = keep[..., offset : offset + x.shape[-1]].contiguous()
    return x * mine.div_(1 - p)


def _add_low_rank(adapted: Adapted, x: torch.Tensor, output: tuple) -> tuple:
    out, bias = output
    group = adapted.linear.tp_group
    sequence_parallel = adapted.linear.config.sequence_parallel
    if adapted.column:
        if sequence_parallel:
            # the low-rank path's input gradient is already whole on every rank: keep this rank's slice
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
        low = copy_to_tensor_model_parallel_region(F.linear(_dropped(adapted, x), adapted.a), group=group)
    else:
        partial = F.linear(_dropped(adapted, x), adapted.a)
        low = (
            reduce_scatter_to_sequence_parallel_region(partial, group=group)
            if sequence_parallel
            else reduce_from_tensor_model_parallel_region(partial, group=group)
        )
    return out + F.linear(low, adapted.b) * adapted.scale, bias


def _sharded_state_dict(adapted: Adapted, prefix: str, sharded_offsets: tuple, metadata: dict | None) -> dict:
    """The layer's own sharded state, its adapters split like its weight (B's rows for a column layer, with
    SwiGLU's gate/up layout; A's columns for a row layer), so a checkpoint loads at any TP size."""
    linear = adapted.linear
    swiglu = (B,) if adapted.column and getattr(linear.weight, "partition_stride", 1) == 2 else ()
    return extra_linear_sharded_state(
        linear,
        {A: adapted.a, B: adapted.b},
        {B: 0} if adapted.column else {A: 1},
        swiglu,
        prefix,
        sharded_offsets,
        metadata,
    )


def attach(chunks: list, cfg: LoraConfig, seed: int) -> None:
    """Add adapters to every targeted linear layer of `chunks` (GPTModels, not yet wrapped for training)."""
    for chunk in chunks:
        for name, linear in target_linears(chunk, cfg.targets):
            _attach_one(name, linear, cfg, seed)
        setattr(chunk, CONFIG_ATTRIBUTE, cfg)


def freeze_base(chunks: list) -> None:
    """Train only the adapters (and an APM's attribute head, which no base model has).

    Under layer recomputation (`model.recompute`) megatron's checkpoint passes gradients back only through inputs
    that require them, and the frozen embedding's output does not: it is marked as requiring one (what HF's
    `enable_input_require_grads` does), or the adapters inside recomputed layers would get no gradient."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(trained(name))
        embedding = getattr(chunk, "embedding", None)  # the first pipeline stage's
        if chunk.config.recompute_granularity is not None and embedding is not None:
            embedding.register_forward_hook(_require_grad)


def _require_grad(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def _adapted(chunks: list) -> list[Adapted]:
    found = []
    for chunk in chunks:
        cfg = config_of(chunk)
        if cfg is not None:
            found += [getattr(linear, _ADAPTED) for _, linear in target_linears(chunk, cfg.targets)]
    return found


def detach(chunks: list) -> tuple[list[Adapted], list[LoraConfig | None]]:
    """Take the adapters off `chunks` (hooks, parameters, checkpoint layout), returning them for `reattach`."""
    adapted = _adapted(chunks)
    for item in adapted:
        item.hook.remove()
        del item.linear._parameters[A], item.linear._parameters[B]
        del item.linear.sharded_state_dict
        delattr(item.linear, _ADAPTED)
    configs = [config_of(chunk) for chunk in chunks]
    for chunk in chunks:
        if config_of(chunk) is not None:
            delattr(chunk, CONFIG_ATTRIBUTE)
    return adapted, configs


def reattach(chunks: list, taken: tuple[list[Adapted], list[LoraConfig | None]]) -> None:
    """Put back what `detach` took: the same parameter objects, so DDP's buffers and the optimizer still hold them."""
    adapted, configs = taken
    for item in adapted:
        item.linear.register_parameter(A, item.a)
        item.linear.register_parameter(B, item.b)
        _install(item)
    for chunk, cfg in zip(chunks, configs):
        if cfg is not None:
            setattr(chunk, CONFIG_ATTRIBUTE, cfg)


@torch.no_grad()
def merge(chunks: list) -> None:
    """Fold the adapters into the weights (W += scale * B A on each rank's slice) and take them off."""
    adapted, _ = detach(chunks)
    for item in adapted:
        weight = cast(torch.Tensor, item.linear.weight)
        delta = item.scale * (item.b.float() @ item.a.float())
        weight.copy_((weight.float() + delta).to(weight.dtype))
