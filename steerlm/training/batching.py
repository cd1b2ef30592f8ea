"""Split a global batch into this data-parallel rank's micro-batches (Megatron's definitions)."""

from __future__ import annotations

import torch

from steerlm.runtime.layout import ParallelLayout

Batch = dict[str, torch.Tensor]


def microbatches_for_rank(global_batch: Batch, micro_batch_size: int, layout: ParallelLayout) -> list[Batch]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches.

    The global batch (`[global_batch_size, ...]` tensors) must be identical on every rank; ranks of
    one model-parallel group get the same share. Gradient accumulation steps =
    global_batch_size / (micro_batch_size * dp).
    """
    size = next(iter(global_batch.values())).shape[0]
    per_rank = size // layout.dp
    if per_rank * layout.dp != size or per_rank % micro_batch_size:
        raise ValueError(
            f"global batch of {size} rows does not split into dp={layout.dp} x micro batches of {micro_batch_size}"
        )
    start = layout.dp_rank * per_rank
    return [
        {key: value[begin : begin + micro_batch_size] for key, value in global_batch.items()}
        for begin in range(start, start + per_rank, micro_batch_size)
    ]
