"""13. RoPE scalings megatron-core 0.16's GPTModel lacks: LongRoPE (Phi-3.5-mini, Phi-4-mini, the 128k Phi-3s) and
YaRN as transformers computes it, and linear scaling with transformers' roundings (megatron's
`seq_len_interpolation_factor` divides the positions, transformers the frequencies); `steerlm.models.rope` gives the
inverse frequencies.

- `ScaledRotaryEmbedding` replaces a built GPTModel's `rotary_pos_emb`. It overrides `RotaryEmbedding.forward(
  max_seq_len, offset, packed_seq, cp_group)`, which GPTModel calls with the forward's rotary length (the sequence
  length; a packed batch's longest sequence) and which returns the `[length, 1, 1, rotary dim]` angles; it keeps
  megatron's context-parallel slicing (`rope_utils.get_pos_emb_on_this_cp_rank`). (megatron's own YaRN embedding
  computes other frequencies where transformers' config names `truncate` or DeepSeek's mscales, and takes its
  parameters from MLA-only config fields.)
- The attention factor: megatron's self-attention multiplies RoPE's cos/sin of queries and keys by
  `_yarn_get_concentration_factor_from_config(config)` (YaRN's mscale; 1.0 for a config without YaRN's fields), a
  name `megatron.core.transformer.attention` imports. `use_scaled_rope` rebinds that name to a function returning the
  model config's `ATTENTION_FACTOR` attribute where it has one and megatron's value otherwise.

LongRoPE has two sets of frequencies; which a forward uses follows transformers' `longrope` update: the long ones for a
sequence longer than the pretraining length (`original_max_positions`). YaRN's are the same at every length.

- Local RoPE (Gemma 3's: its sliding-window layers rotate with plain RoPE of another base, `use_local_rope`): GPTModel
  computes one rotary table a forward and its TransformerBlock hands it to every layer as the keyword `rotary_pos_emb`
  (in recomputed chunks too). A forward pre-hook on each sliding layer — megatron's own
  `transformer.utils.is_layer_window_attention` says which — replaces it by the local embedding's
  (`local_rotary_pos_emb`, a `ScaledRotaryEmbedding` child of the GPTModel) over as many positions. Both tables start
  at position 0, as megatron's always do (a decoding step's attention picks its positions out of the table); context
  parallelism, which slices the table, needs Transformer Engine, which steerlm refuses for windows.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import attention
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

ATTENTION_FACTOR = "steerlm_rope_attention_factor"  # the attribute of a TransformerConfig `use_scaled_rope` sets
_MEGATRON_FACTOR = getattr(attention, "_yarn_get_concentration_factor_from_config", None)


class ScaledRotaryEmbedding(RotaryEmbedding):
    """megatron's non-interleaved RoPE on the first `2 * len(inverse)` channels of each head with the given inverse
    frequencies; with `long_inverse`, those for a sequence of more than `original_max_positions` positions."""

    def __init__(
        self,
        rotary_percent: float,
        kv_channels: int,
        inverse: torch.Tensor,
        long_inverse: torch.Tensor | None = None,
        original_max_positions: int | None = None,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__(
            kv_channels=kv_channels, rotary_percent=rotary_percent, use_cpu_initialization=True, cp_group=cp_group
        )
        for frequencies in (inverse, long_inverse):
            if frequencies is not None and frequencies.shape != self.inv_freq.shape:
                raise ValueError(f"{frequencies.numel()} inverse frequencies for {self.inv_freq.numel()} channel pairs")
        self.register_buffer("short_inv_freq", inverse.float(), persistent=False)
        self.register_buffer("long_inv_freq", None if long_inverse is None else long_inverse.float(), persistent=False)
        self.original_max_positions = original_max_positions

    @property
    def switches(self) -> bool:
        """Whether the frequencies depend on the sequence's length (LongRoPE)."""
        return self.long_inv_freq is not None

    def angles(self, length: int, long: bool, offset: int = 0) -> torch.Tensor:
        """`[length, 1, 1, rotary dim]`: the angles of positions offset … offset + length - 1, with the long or
        the short frequencies."""
        inverse = self.long_inv_freq if long and self.long_inv_freq is not None else self.short_inv_freq
        positions = torch.arange(length, device=inverse.device, dtype=inverse.dtype) + offset
        frequencies = torch.outer(positions, inverse)
        return torch.cat((frequencies, frequencies), dim=-1)[:, None, None, :]

    def is_long(self, positions: int) -> bool:
        """Whether a sequence of `positions` positions rotates with the long frequencies."""
        return self.switches and self.original_max_positions is not None and positions > self.original_max_positions

    def forward(  # uncached, unlike megatron's: one outer product of positions and frequencies a forward
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        angles = self.angles(max_seq_len, self.is_long(offset + max_seq_len), offset)
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            angles = get_pos_emb_on_this_cp_rank(angles, 0, group)
        return angles


def attention_factor(config: TransformerConfig) -> float:
    """What megatron's attention multiplies RoPE's cos and sin by for this config (with `use_scaled_rope`'s)."""
    return _concentration(config)


def _concentration(config: TransformerConfig) -> float:
    factor = getattr(config, ATTENTION_FACTOR, None)
    if factor is not None:
        return float(factor)
    return 1.0 if _MEGATRON_FACTOR is None else float(_MEGATRON_FACTOR(config))


def use_scaled_rope(
    gpt: GPTModel,
    rotary_percent: float,
    inverse: torch.Tensor,
    long_inverse: torch.Tensor | None,
    original_max_positions: int,
    factor: float,
) -> None:
    """Give a GPTModel chunk (built with RoPE, before `.to(device)`) these inverse frequencies and attention factor."""
    if _MEGATRON_FACTOR is None:
        raise RuntimeError(
            "megatron.core.transformer.attention has no _yarn_get_concentration_factor_from_config: this "
            "megatron-core changed how attention scales RoPE's cos/sin; update steerlm.megatron_compat.scaled_rope"
        )
    attention._yarn_get_concentration_factor_from_config = _concentration
    setattr(gpt.config, ATTENTION_FACTOR, factor)
    gpt.rotary_pos_emb = ScaledRotaryEmbedding(
        rotary_percent=rotary_percent,
        kv_channels=gpt.config.kv_channels,
        inverse=inverse,
        long_inverse=long_inverse,
        original_max_positions=original_max_positions,
        cp_group=gpt.rotary_pos_emb.cp_group,
    )


LOCAL_ROPE = "local_rotary_pos_emb"  # the GPTModel child `use_local_rope` adds


def use_local_rope(gpt: GPTModel, rotary_percent: float, inverse: torch.Tensor) -> None:
    """Rotate the sliding-window layers of a GPTModel chunk (built with RoPE and a window) with these inverse
    frequencies instead of the model's."""
    config = gpt.config
    local = ScaledRotaryEmbedding(
        rotary_percent=rotary_percent,
        kv_channels=config.kv_channels,
        inverse=inverse,
        cp_group=gpt.rotary_pos_emb.cp_group,
    )
    setattr(gpt, LOCAL_ROPE, local)
    hook = _local_rotation(local)  # one for the chunk's sliding layers: they share its table
    for layer in gpt.decoder.layers:
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer.layer_number):
            layer.register_forward_pre_hook(hook, with_kwargs=True)


def local_rotary_embedding(gpt: torch.nn.Module) -> Optional[ScaledRotaryEmbedding]:
    """A GPTModel chunk's sliding-window layers' rotary embedding (`use_local_rope`); None where every layer rotates
    alike."""
    return getattr(gpt, LOCAL_ROPE, None)


def _local_rotation(local: ScaledRotaryEmbedding):
    """The pre-hook swapping a layer's `rotary_pos_emb` for `local`'s table of as many positions. The table of the last
    length asked is kept (it needs no gradient): the sliding layers of a forward, and a decoder's steps over the same
    maximum length, compute it once."""
    kept: dict[tuple[int, torch.device], torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        table = kwargs.get("rotary_pos_emb")
        if table is None:
            raise RuntimeError(
                "megatron's TransformerBlock handed a layer no rotary_pos_emb keyword: this megatron-core changed how "
                "RoPE reaches its layers; update steerlm.megatron_compat.scaled_rope (use_local_rope)"
            )
        key = (table.shape[0], table.device)
        if key not in kept:
            kept.clear()
            kept[key] = local(table.shape[0]).to(table.device)
        return args, {**kwargs, "rotary_pos_emb": kept[key]}

    return hook
