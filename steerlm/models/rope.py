"""The inverse frequencies of the RoPE scalings megatron-core 0.16 lacks, computed as transformers computes them
(`modeling_rope_utils`), so an imported model rotates exactly as it did: LongRoPE (Phi-3.5-mini, Phi-4-mini, the 128k
Phi-3s), YaRN (Qwen2.5 and Qwen3 past 32k positions, as their model cards enable it) and linear scaling
(DeepSeek-Coder; NeMo's `seq_len_interpolation_factor`, which megatron applies by dividing the positions instead: the
same angles but for their last bits), and Gemma 3's plain RoPE of another base on its sliding-window layers.
`rope_frequencies` and `local_rope_frequencies` give a `ModelConfig`'s; `steerlm.megatron_compat.scaled_rope` puts
them in the model."""

from __future__ import annotations

import math

import torch

from steerlm.config.model import ModelConfig


def _powers(base: float, dim: int) -> torch.Tensor:
    """base ** (2i / dim) for the dim / 2 channel pairs, in float32 as transformers computes it."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def long_rope_inverse_frequencies(base: float, dim: int, factors: list[float]) -> torch.Tensor:
    """LongRoPE's: each channel pair's inverse frequency divided by its factor."""
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * _powers(base, dim))


def linear_inverse_frequencies(base: float, dim: int, factor: float) -> torch.Tensor:
    """Linear scaling's (position interpolation): every inverse frequency divided by `factor`."""
    return (1.0 / _powers(base, dim)) / factor


def local_rope_frequencies(model: ModelConfig) -> torch.Tensor | None:
    """The inverse frequencies of Gemma 3's sliding-window layers, plain RoPE of base `model.rope_local_base_freq`
    (transformers' `default` RoPE of the `sliding_attention` layer type); None for a model whose layers rotate alike."""
    if model.rope_local_base_freq is None:
        return None
    return 1.0 / _powers(float(model.rope_local_base_freq), int(model.head_dim * model.rotary_percent))


def yarn_inverse_frequencies(
    base: float, dim: int, factor: float, original: int, beta_fast: float, beta_slow: float, truncate: bool
) -> torch.Tensor:
    """YaRN's: the channel pairs that turn fewer than `beta_slow` times over the pretraining length `original` are
    interpolated (divided by `factor`), those that turn more than `beta_fast` times kept, a linear ramp between."""

    def pair(rotations: float) -> float:  # the channel pair that turns `rotations` times over `original` positions
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair(beta_fast), pair(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp
    powers = _powers(base, dim)
    return (1.0 / (factor * powers)) * (1 - kept) + (1.0 / powers) * kept


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """The attention factor transformers gives YaRN when config.json names none (0.1 ln(factor) + 1, or DeepSeek's
    ratio of two such terms)."""

    def term(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(term(factor, mscale) / term(factor, mscale_all_dim))
    return term(factor)


def long_rope_attention_factor(scale: float, original: int) -> float:
    """The attention factor transformers gives LongRoPE when config.json names none: sqrt(1 + ln(scale) /
    ln(original)) for a scale (`factor`, else max_position_embeddings / original) above 1."""
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def rope_frequencies(model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`model`'s inverse frequencies where its RoPE is LongRoPE's (short, long), YaRN's or linearly scaled (one,
    None); None for the RoPE megatron computes itself (plain, or Llama-3.1's scaling)."""
    dim = int(model.head_dim * model.rotary_percent)
    base = float(model.rotary_base)
    if model.long_rope:
        assert model.rope_short_factor is not None and model.rope_long_factor is not None  # validated together
        short = long_rope_inverse_frequencies(base, dim, model.rope_short_factor)
        return short, long_rope_inverse_frequencies(base, dim, model.rope_long_factor)
    if model.rope_yarn_factor is not None:
        yarn = yarn_inverse_frequencies(
            base,
            dim,
            model.rope_yarn_factor,
            model.rope_original_max_positions,
            model.rope_yarn_beta_fast,
            model.rope_yarn_beta_slow,
            model.rope_yarn_truncate,
        )
        return yarn, None
    if model.rope_linear_factor is not None:
        return linear_inverse_frequencies(base, dim, model.rope_linear_factor), None
    return None
