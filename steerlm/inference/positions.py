"""Which positions one forward of the lean decoder (`steerlm.inference.decoders.LeanDecoder`) computes, and what each
of them attends to: a span of every row (a prefill or a chunk of one), one new position per row (a decode step), or
continuations after shared prefixes. Each gives RoPE's cos/sin for its positions, stores the new keys and values in the
cache, and masks the cached ones it must not see (SDPA's boolean masks: True where attention is allowed; or the causal
flag). A layer attending to a sliding window (`model.sliding_window`) takes `windowed(window)`: the same mask, each
query limited to the `window` positions up to its own (itself included, as transformers' sliding windows count), and
rotates with the sliding layers' own RoPE where the model has one (Gemma 3's local RoPE, `rotation(windowed=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from steerlm.megatron_compat import sliding_window_mask

if TYPE_CHECKING:
    from steerlm.inference.decoders import LeanDecoder


class _Masks:
    """What every kind of positions shares: its masks per window, each computed once per forward, and RoPE's tables."""

    mask: torch.Tensor | None
    causal: bool
    cos: torch.Tensor
    sin: torch.Tensor
    local: tuple[torch.Tensor, torch.Tensor] | None

    def _rotate(self, decoder: LeanDecoder, index: slice | torch.Tensor, long: Long, shape: Callable) -> None:
        """RoPE's cos and sin at positions `index` (`shape`d to the queries' layout), and the sliding layers' own."""
        self.cos, self.sin = (shape(table) for table in decoder.rotation(index, long))
        local = decoder.local_rotation(index)
        self.local = None if local is None else (shape(local[0]), shape(local[1]))

    def rotation(self, windowed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin a layer rotates its queries and keys with: a sliding-window layer's own where the model has
        them (Gemma 3's local RoPE), else the model's."""
        return self.local if windowed and self.local is not None else (self.cos, self.sin)

    def windowed(self, window: int) -> torch.Tensor:
        """The mask (`[..., queries, keys]`, True where allowed) of a layer attending to `window` positions."""
        masks: dict[int, torch.Tensor] = self.__dict__.setdefault("_windows", {})
        if window not in masks:
            masks[window] = self._window(window)
        return masks[window]

    def _window(self, window: int) -> torch.Tensor:
        raise NotImplementedError


class Span(_Masks):
    """Positions `start … start+n-1` of every row (a prefill, or one chunk of it): the cache is written in a slice,
    attention is causal over every position up to each one (`start` > 0: a chunk after the ones before it, whose
    keys are in the cache; a boolean mask, which the fused CPU and memory-efficient CUDA kernels take without
    materialising the scores). Rows shorter than the span compute past their prompt; those entries are overwritten
    before they are read."""

    def __init__(self, decoder: LeanDecoder, n: int, start: int = 0, long: Long = False) -> None:
        self.start, self.end, self.device = start, start + n, decoder.device
        # [n, 1, rotary channels], or [rows, n, 1, …] where LongRoPE's factors differ per row
        self._rotate(decoder, slice(start, self.end), long, lambda table: table.unsqueeze(-2))
        self.mask, self.causal = None, n > 1
        if start:
            queries = torch.arange(start, self.end, device=decoder.device)
            self.mask = torch.arange(self.end, device=decoder.device)[None] <= queries[:, None]  # [n, end]
            self.causal = False

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        cache[:, :, self.start : self.end] = new

    def _window(self, window: int) -> torch.Tensor:
        return sliding_window_mask(self.end - self.start, self.end, window, self.device)  # [n, end]

    def visible(self, cache: torch.Tensor) -> torch.Tensor:
        return cache[:, :, : self.end]


class Rows(_Masks):
    """One new position per row, each row at its own (`positions` [rows], a device tensor): the new key and
    value are scattered there; a row attends to its own positions up to this one, the rest masked out.
    `end`: the cache positions to read (eager: one past the furthest row), or None for the whole cache
    (static shapes, for CUDA graphs)."""

    mask: torch.Tensor

    def __init__(self, decoder: LeanDecoder, positions: torch.Tensor, end: int | None) -> None:
        self.index = positions
        long = decoder.long_rows if decoder.long_from is not None else False
        self._rotate(decoder, positions, long, lambda table: table[:, None, None])  # [rows, 1, 1, …]
        self.end = end
        span = decoder.cache[0][0].shape[2] if end is None else end
        self.mask = (torch.arange(span, device=positions.device)[None] <= positions[:, None])[:, None, None]
        self.causal = False

    def _window(self, window: int) -> torch.Tensor:
        keys = torch.arange(self.mask.shape[-1], device=self.index.device)[None]
        return self.mask & (self.index[:, None] - keys < window)[:, None, None]  # [rows, 1, 1, span]

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        rows, groups, _, head_dim = new.shape
        cache.scatter_(2, self.index.view(rows, 1, 1, 1).expand(rows, groups, 1, head_dim), new)

    def visible(self, cache: torch.Tensor) -> torch.Tensor:
        return cache if self.end is None else cache[:, :, : self.end]


class Continuation(_Masks):
    """`n` new positions per row after a prefix already in the cache, row r's at `offsets[r]`, `offsets[r] + 1`,
    ... The cache holds `prefix` positions (each row's own prefix, right-padded to the longest) then the `n` new
    ones: a row attends to the first `offsets[r]` of the former and causally to the latter. Padded new positions
    past the end of RoPE's table are clamped: their outputs are never read, and no real position sees them."""

    mask: torch.Tensor

    def __init__(self, decoder: LeanDecoder, offsets: torch.Tensor, prefix: int, n: int, long: Long = False) -> None:
        steps = torch.arange(n, device=offsets.device)
        positions = (offsets[:, None] + steps).clamp(max=decoder.cos.shape[0] - 1)  # [rows, n]
        self._rotate(decoder, positions, long, lambda table: table[:, :, None])
        keys = torch.arange(prefix + n, device=offsets.device)
        held = keys[None, None] < offsets[:, None, None]  # [rows, 1, prefix + n]: the row's own prefix
        new = (keys[None] >= prefix) & (keys[None] - prefix <= steps[:, None])  # [n, prefix + n]: causal
        self.mask = (held | new[None])[:, None]  # [rows, 1, n, prefix + n]
        self.start, self.causal = prefix, False
        # each key's position in its row (the prefix's own, then the row's new ones) and each query's
        self.key_positions = torch.where(keys[None] < prefix, keys[None], offsets[:, None] + keys[None] - prefix)
        self.query_positions = offsets[:, None] + steps  # [rows, n]

    def _window(self, window: int) -> torch.Tensor:
        near = self.query_positions[:, :, None] - self.key_positions[:, None] < window  # [rows, n, prefix + n]
        return self.mask & near[:, None]

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        cache[:, :, self.start :] = new

    def visible(self, cache: torch.Tensor) -> torch.Tensor:
        return cache


Positions = Span | Rows | Continuation
# LongRoPE's long factors or not (`LeanDecoder.rotation`): for every row, or per row (a bool tensor [rows])
Long = bool | torch.Tensor
