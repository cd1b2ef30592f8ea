"""Map between megatron's per-rank parameter shards and layout-independent full tensors.

A parameter's identity across layouts is its *global name* (state-dict name with the pipeline
stage's local layer index replaced by the global one) plus, for tensor-parallel parameters,
megatron's `partition_dim` / `partition_stride` attributes; Transformer Engine's fused-norm parameters carry
the local layers' names. Initialisation, parity tests and HF export all go through these helpers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from steerlm.megatron_compat import unfused_norm_name

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_EMBEDDING = "embedding.word_embeddings.weight"


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def partition_dim(param: torch.Tensor) -> int:
    """The dimension megatron splits a tensor-parallel parameter along (its `partition_dim` attribute)."""
    dim = getattr(param, "partition_dim", None)
    if dim is None:
        raise ValueError(f"a tensor-parallel parameter of shape {tuple(param.shape)} has no partition_dim")
    return int(dim)


def full_shape(param: torch.Tensor, tp: int) -> torch.Size:
    if not is_tp_sharded(param):
        return param.shape
    shape = list(param.shape)
    shape[partition_dim(param)] *= tp
    return torch.Size(shape)


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of `full`, stride-aware (e.g. SwiGLU's fc1 holds [gate_r; up_r])."""
    if not is_tp_sharded(param):
        return full
    dim, stride = partition_dim(param), getattr(param, "partition_stride", 1)
    piece = full.shape[dim] // (tp * stride)
    pieces = torch.split(full, piece, dim=dim)
    return torch.cat(pieces[tp_rank::tp], dim=dim)


def unshard(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of `shard` given every TP rank's slice in rank order."""
    if not is_tp_sharded(param):
        return shards[0]
    return unshard_along(shards, partition_dim(param), getattr(param, "partition_stride", 1))


def unshard_along(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every TP rank's slice (rank order), each holding `stride` pieces along `dim`
    (SwiGLU's fc1: [gate_r; up_r] → [gate; up])."""
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def shard_along(full: torch.Tensor, dim: int, stride: int, tp: int) -> list[torch.Tensor]:
    """Every TP rank's slice of `full` (rank order): the inverse of `unshard_along`."""
    pieces = [torch.chunk(piece, tp, dim=dim) for piece in torch.chunk(full, stride, dim=dim)]
    return [torch.cat([piece[rank] for piece in pieces], dim=dim).contiguous() for rank in range(tp)]


def gather_full(local: torch.Tensor, param: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather a TP-sharded tensor (a parameter or its gradient) into the full tensor."""
    tp = dist.get_world_size(tp_group)
    if tp == 1 or not is_tp_sharded(param):
        return local
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=tp_group)
    return unshard(shards, param)


def global_name(name: str, chunk: GPTModel) -> str:
    """State-dict name with the global layer index; a tied output weight maps to the embedding; Transformer
    Engine's fused-norm parameters get the local layers' names (one name per parameter, whatever the layers)."""
    match = _LAYER.match(name)
    if match:
        layer = chunk.decoder.layers[int(match.group(1))]
        return unfused_norm_name(f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :])
    if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return TIED_EMBEDDING
    return name


def named_global_parameters(chunks: list[GPTModel]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, local parameter) over this rank's model chunks."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            yield global_name(name, chunk), param


@torch.no_grad()
def load_full_parameters(
    chunks: list[GPTModel],
    full: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp: int,
    keep: Callable[[str], bool] = lambda name: False,
) -> None:
    """Copy layout-independent full tensors (keyed by global name) into this rank's shards.

    Parameters whose global name `keep` accepts are left as they are (e.g. a head the source lacks).
    """
    for name, param in named_global_parameters(chunks):
        if keep(name):
            continue
        if name not in full:
            raise KeyError(f"no tensor for parameter {name!r} in the given state ({len(full)} tensors)")
        source = full[name]
        if source.shape != full_shape(param, tp):
            raise ValueError(
                f"{name}: state holds shape {tuple(source.shape)}, the model needs {tuple(full_shape(param, tp))}"
            )
        param.copy_(shard(source.to(param.device, param.dtype), param, tp_rank, tp))


def weights_digest(chunks: list[GPTModel], tp_group: dist.ProcessGroup) -> str:
    """SHA-256 over every full parameter (global name order), identical on every rank; collective.

    Two runs have bitwise-identical weights exactly when their digests match, whatever their layouts.
    """
    local = {}
    for name, param in named_global_parameters(chunks):
        full = gather_full(param.detach(), param, tp_group).contiguous().cpu()
        local[name] = hashlib.sha256(full.view(torch.uint8).numpy().tobytes()).hexdigest()
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    merged = {name: digest for part in gathered for name, digest in part.items()}
    return hashlib.sha256("".join(f"{n}:{merged[n]}\n" for n in sorted(merged)).encode()).hexdigest()
