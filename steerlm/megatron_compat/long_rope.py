"""13. LongRoPE in megatron's GPTModel (Phi-3.5-mini, Phi-4-mini, the 128k Phi-3 models).

LongRoPE divides each rotary channel pair's inverse frequency by a factor of its own — the short factors for a
forward whose positions stay within the pretraining length (`original_max_positions`), the long ones beyond it —
and multiplies RoPE's cos and sin by an attention factor. megatron-core 0.16's `RotaryEmbedding` has neither:

- `LongRotaryEmbedding` replaces a built GPTModel's `rotary_pos_emb`. It overrides `RotaryEmbedding.forward(
  max_seq_len, offset, packed_seq, cp_group)`, which GPTModel calls with the forward's rotary length (the sequence
  length; a packed batch's longest sequence) and which returns the `[length, 1, 1, rotary dim]` angles; it keeps
  megatron's context-parallel slicing (`rope_utils.get_pos_emb_on_this_cp_rank`).
- The attention factor: megatron's self-attention multiplies RoPE's cos/sin of queries and keys by
  `_yarn_get_concentration_factor_from_config(config)` (YaRN's mscale; 1.0 for a config without YaRN's fields), a
  name `megatron.core.transformer.attention` imports. `use_long_rope` rebinds that name to a function returning the
  model config's `ATTENTION_FACTOR` attribute where it has one and megatron's value otherwise.

Which factors a forward uses follows transformers' `longrope` update: the long ones when its furthest position is
at or past `original_max_positions` (a sequence of more than that many positions). The angles are computed as
transformers computes them (`1 / (factor * base ** (2i / dim))`), so the two agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import attention
from megatron.core.transformer.transformer_config import TransformerConfig

ATTENTION_FACTOR = "steerlm_rope_attention_factor"  # the attribute of a TransformerConfig `use_long_rope` sets
_MEGATRON_FACTOR = getattr(attention, "_yarn_get_concentration_factor_from_config", None)


class LongRotaryEmbedding(RotaryEmbedding):
    """megatron's non-interleaved RoPE on the first `2 * len(short_factor)` channels of each head, each channel
    pair's inverse frequency divided by its short or long factor."""

    def __init__(
        self,
        rotary_percent: float,
        kv_channels: int,
        rotary_base: float,
        short_factor: Sequence[float],
        long_factor: Sequence[float],
        original_max_positions: int,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=rotary_percent,
            rotary_base=rotary_base,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        dim = 2 * len(short_factor)
        if len(long_factor) != len(short_factor) or dim != self.inv_freq.numel() * 2:
            raise ValueError(
                f"LongRoPE needs one short and one long factor per rotary channel pair ({self.inv_freq.numel()}), "
                f"got {len(short_factor)} and {len(long_factor)}"
            )
        powers = rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        self.register_buffer("short_inv_freq", 1.0 / (torch.tensor(short_factor, dtype=torch.float32) * powers), False)
        self.register_buffer("long_inv_freq", 1.0 / (torch.tensor(long_factor, dtype=torch.float32) * powers), False)
        self.original_max_positions = original_max_positions

    def angles(self, length: int, long: bool, offset: int = 0) -> torch.Tensor:
        """`[length, 1, 1, rotary dim]`: the angles of positions offset … offset + length - 1, with the long or
        the short factors."""
        inverse = self.long_inv_freq if long else self.short_inv_freq
        positions = torch.arange(length, device=inverse.device, dtype=inverse.dtype) + offset
        frequencies = torch.outer(positions, inverse)
        return torch.cat((frequencies, frequencies), dim=-1)[:, None, None, :]

    def forward(  # uncached, unlike megatron's: one outer product of positions and frequencies a forward
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        angles = self.angles(max_seq_len, offset + max_seq_len > self.original_max_positions, offset)
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            angles = get_pos_emb_on_this_cp_rank(angles, 0, group)
        return angles


def attention_factor(config: TransformerConfig) -> float:
    """What megatron's attention multiplies RoPE's cos and sin by for this config (with `use_long_rope`'s)."""
    return _concentration(config)


def _concentration(config: TransformerConfig) -> float:
    factor = getattr(config, ATTENTION_FACTOR, None)
    if factor is not None:
        return float(factor)
    return 1.0 if _MEGATRON_FACTOR is None else float(_MEGATRON_FACTOR(config))


def use_long_rope(
    gpt: GPTModel,
    rotary_percent: float,
    rotary_base: float,
    short_factor: Sequence[float],
    long_factor: Sequence[float],
    original_max_positions: int,
    factor: float,
) -> None:
    """Give a GPTModel chunk (built with RoPE, before `.to(device)`) LongRoPE's factors and attention factor."""
    if _MEGATRON_FACTOR is None:
        raise RuntimeError(
            "megatron.core.transformer.attention has no _yarn_get_concentration_factor_from_config: this "
            "megatron-core changed how attention scales RoPE's cos/sin; update steerlm.megatron_compat.long_rope"
        )
    attention._yarn_get_concentration_factor_from_config = _concentration
    setattr(gpt.config, ATTENTION_FACTOR, factor)
    gpt.rotary_pos_emb = LongRotaryEmbedding(
        rotary_percent=rotary_percent,
        kv_channels=gpt.config.kv_channels,
        rotary_base=rotary_base,
        short_factor=short_factor,
        long_factor=long_factor,
        original_max_positions=original_max_positions,
        cp_group=gpt.rotary_pos_emb.cp_group,
    )
