"""Split a global batch into this data-parallel rank's micro-batches (Megatron's definitions), each cut to the
positions it trains on."""

from __future__ import annotations

import math

import torch

from steerlm.runtime.layout import ParallelLayout

Batch = dict[str, torch.Tensor]
# the [rows, positions] tensors of a batch (attention_mask, when present, is [rows, 1, positions, positions])
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def length_multiple(layout: ParallelLayout) -> int:
    """What a micro-batch's length must divide by: TP under sequence parallelism (the sequence is scattered
    over TP ranks) and 2 x CP under context parallelism (megatron's load-balanced chunks)."""
    return math.lcm(layout.tp if layout.sequence_parallel else 1, 2 * layout.cp if layout.cp > 1 else 1)


def needed_positions(batch: Batch) -> int | None:
    """Positions a micro-batch's loss and predictions read: up to the last `score_index` (a regression APM's
    read-out) or the last position any row trains on (`loss_mask`); None when the batch names neither."""
    if "score_index" in batch:
        return int(batch["score_index"].max()) + 1
    if "loss_mask" in batch:
        trained = batch["loss_mask"].any(dim=0).nonzero()
        return int(trained[-1]) + 1 if len(trained) else 1
    return None


def trim_padding(batch: Batch, multiple: int = 1) -> Batch:
    """`batch` without the trailing positions nothing reads (rounded up to `multiple`).

    Exact: attention is causal (packed documents too), so no position's output depends on a later one, and the
    positions cut are padding or untrained. A global batch is padded to its longest row; each micro-batch then
    computes only up to its own, as NeMo's per-micro-batch padding does.
    """
    length = batch["tokens"].shape[1]
    needed = needed_positions(batch)
    if needed is None:
        return batch
    cut = min(length, -(-needed // multiple) * multiple)
    if cut == length:
        return batch
    trimmed = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in trimmed:
            trimmed[key] = trimmed[key][:, :cut]
    if "attention_mask" in trimmed:
        trimmed["attention_mask"] = trimmed["attention_mask"][..., :cut, :cut]
    return trimmed


def microbatches_for_rank(global_batch: Batch, micro_batch_size: int, layout: ParallelLayout) -> list[Batch]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches.

    The global batch (`[global_batch_size, ...]` tensors) must be identical on every rank; ranks of
    one model-parallel group get the same share. Gradient accumulation steps =
    global_batch_size / (micro_batch_size * dp). Each micro-batch is trimmed to the positions it needs
    (`trim_padding`, the same cut on every rank: it depends on the batch alone); under pipeline parallelism
    megatron exchanges each micro-batch's shape between stages (`variable_seq_lengths`), except in the
    interleaved schedule (virtual pipeline stages), whose micro-batches keep the global batch's length.
    """
    size = next(iter(global_batch.values())).shape[0]
    per_rank = size // layout.dp
    if per_rank * layout.dp != size or per_rank % micro_batch_size:
        raise ValueError(
            f"global batch of {size} rows does not split into dp={layout.dp} x micro batches of {micro_batch_size}"
        )
    start, multiple = layout.dp_rank * per_rank, length_multiple(layout)
    shares = [
        {key: value[begin : begin + micro_batch_size] for key, value in global_batch.items()}
        for begin in range(start, start + per_rank, micro_batch_size)
    ]
    if layout.vpp is not None and layout.vpp > 1:  # one p2p tensor shape for every micro-batch
        return shares
    return [trim_padding(share, multiple) for share in shares]


def length_sorted_order(lengths: list[int], micro_batch_size: int, dp: int) -> list[int]:
    """An order of a global batch's rows (indices into `lengths`) in which each micro-batch holds rows of
    similar length, so that `trim_padding` cuts each to its own longest; micro-batch k of every DP rank gets
    neighbouring slices of the longest-first order, so the ranks' shares are about equally long. The loss is a
    sum over the global batch's tokens, so the order changes which rows meet in a micro-batch, not the step."""
    ranked = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    per_rank = len(lengths) // dp
    order = [0] * len(lengths)
    for chunk in range(len(lengths) // micro_batch_size):
        k, rank = divmod(chunk, dp)
        begin = rank * per_rank + k * micro_batch_size
        order[begin : begin + micro_batch_size] = ranked[chunk * micro_batch_size : (chunk + 1) * micro_batch_size]
    return order
