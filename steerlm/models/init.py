"""Layout-independent parameter initialisation.

Megatron's own initialisation depends on the layout: with GPU initialisation each TP rank draws from
its own RNG stream, and with CPU initialisation every pipeline stage restarts the same stream, so
PP=2 does not reproduce PP=1. Here every parameter is drawn from a generator seeded by
(seed, global name) at its full shape and then sliced for this TP rank, so one seed gives the same
model at every TP/PP/DP layout (on the same device type). The distributions are Megatron's: normal
with `init_method_std`, scaled by 1/sqrt(2 * num_layers) for the output projections of attention
and MLP; norm weights one (zero under `model.layernorm_zero_centered_gamma`), biases zero.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.models.gpt import GPTModel

from steerlm.config.schema import ModelConfig
from steerlm.models.sharding import full_shape, global_name, shard
from steerlm.runtime.layout import ParallelLayout

_SCALED = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_std(name: str, model: ModelConfig) -> float:
    if name.endswith(_SCALED):
        return model.init_method_std / math.sqrt(2.0 * model.num_layers)
    return model.init_method_std


@torch.no_grad()
def initialize_parameters(chunk: GPTModel, model: ModelConfig, seed: int, layout: ParallelLayout) -> None:
    for local_name, param in chunk.named_parameters():
        name = global_name(local_name, chunk)
        if param.dim() < 2:
            # a norm's weight is 1 (0 when stored centred on zero); biases are 0
            param.fill_(0.0 if local_name.endswith("bias") or model.layernorm_zero_centered_gamma else 1.0)
            continue
        generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
        full = torch.empty(full_shape(param, layout.tp), dtype=torch.float32, device=param.device)
        full.normal_(0.0, init_std(name, model), generator=generator)
        param.copy_(shard(full, param, layout.tp_rank, layout.tp))
