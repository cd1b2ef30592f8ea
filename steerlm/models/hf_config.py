"""Reading a Hugging Face config.json: the `model.*` fields it determines (`hf_model_fields`, for an import's model) and
the check of a run's model against it (`check_hf_config`, for `init_from` an HF directory). The families and the
weight mapping: `steerlm.models.hf_llama`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from steerlm.config.schema import ModelConfig
from steerlm.errors import ConfigError
from steerlm.models.hf_llama import (
    GEMMA2_FIELDS,
    HF_ARCHITECTURES,
    LLAMA,
    LLAMA3_SCALING,
    NEMOTRON,
    HFArchitecture,
    sliding_layers,
)
from steerlm.models.rope import long_rope_attention_factor, yarn_attention_factor


def _rope(hf: dict, family: HFArchitecture) -> tuple[float, dict, float]:
    """(rope theta, scaling parameters, the sliding layers' theta) from transformers 5's `rope_parameters` (one, or one
    per layer type: Gemma 3's) or 4's `rope_theta` / `rope_scaling` / `rope_local_base_freq`; Gemma3TextConfig's
    defaults (1M, 10k) where a Gemma 3's config.json names none."""
    theta, local = (1_000_000.0, 10_000.0) if family.local_rope else (10_000.0, None)
    parameters = hf.get("rope_parameters") or {}
    if "full_attention" in parameters:
        full, sliding = parameters["full_attention"], parameters.get("sliding_attention") or {}
        return float(full.get("rope_theta", theta)), full, float(sliding.get("rope_theta", local or theta))
    scaling = hf.get("rope_scaling") or parameters
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", theta)))
    return theta, scaling, float(hf.get("rope_local_base_freq", local or theta))


def _integral(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def attention_window(hf: dict) -> int | None:
    """The positions a sliding-window layer attends to (Mistral's `sliding_window`; Qwen2's under
    `use_sliding_window`, or transformers 5's `layer_types`), None when every layer attends to every position (or the
    window is as long as the model's positions)."""
    types = hf.get("layer_types")
    sliding = "sliding_attention" in types if types is not None else hf.get("use_sliding_window", True)
    window = hf.get("sliding_window") if sliding else None
    return None if window is None or window >= hf["max_position_embeddings"] else window


def _window_fields(hf: dict, family: HFArchitecture) -> tuple[int | None, int | None] | None:
    """(`model.sliding_window`, `model.window_attn_skip_freq`) of a config.json, or None where the family's windows
    (Qwen2's on its last layers) are not steerlm's: those layers attend to every position, the same function on
    sequences as long as the window (`unmodelled_window`)."""
    window = attention_window(hf)
    if window is None:
        return None, None
    if not family.sliding:
        return None
    types = hf.get("layer_types")
    if types is None:  # transformers 4: every layer slides, Gemma 2's every other one or Gemma 3's pattern
        return window, hf.get("sliding_window_pattern", family.window_skip) if family.local_rope else family.window_skip
    slides = [kind == "sliding_attention" for kind in types]
    for skip in (None, *range(2, len(slides) + 1)):
        if slides == sliding_layers(len(slides), skip):
            return window, skip
    return None


def unmodelled_window(hf: dict) -> int | None:
    """The window of a config.json whose sliding layers steerlm does not model (it then limits the positions)."""
    family = HF_ARCHITECTURES.get(hf.get("model_type", "llama"), LLAMA)
    return attention_window(hf) if _window_fields(hf, family) is None else None


def hf_model_fields(hf: dict, key: str, location: str) -> dict:
    """The `model.*` fields an HF Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3 or Gemma 1/2/3 config.json determines
    (`num_query_groups`/`kv_channels` explicit, and the family's norm, activation, biases and RoPE share).

    `key`/`location`: the config key that named the directory and its value, for the ConfigError of a model
    `model.*` cannot describe at all (another architecture, other RoPE scaling, biases).
    """
    family = HF_ARCHITECTURES.get(hf.get("model_type", "llama"))
    unsupported = [f"model_type={hf.get('model_type')!r}"] if family is None else []
    family = family or LLAMA
    rope_theta, scaling, local_theta = _rope(hf, family)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    unsupported += [
        f"{name}={hf.get(name)!r}"
        for name, expected in (
            ("hidden_act", (family.hidden_act, *family.legacy_acts)),
            ("hidden_activation", (family.hidden_act,)),
            ("attention_bias", (False,)),
            ("mlp_bias", (False,)),
            ("use_bidirectional_attention", (False,)),  # Gemma 3's embedding models
        )
        if hf.get(name) not in (None, *expected)  # transformers 5 writes `attention_bias: null` for Qwen2 and Mistral
    ]
    llama3 = family.llama3_rope and rope_type == "llama3"
    long_rope = family.long_rope and rope_type in _LONG_ROPE_TYPES
    yarn = family.yarn and rope_type == "yarn"
    linear = family.linear and rope_type == "linear"
    if not (rope_type == "default" or llama3 or long_rope or yarn or linear) or (
        llama3 and any(scaling.get(name) != value for name, value in LLAMA3_SCALING.items())
    ):
        unsupported.append(f"rope scaling {scaling}")
    if unsupported:
        raise ConfigError(
            key,
            location,
            f"holds a model steerlm cannot express ({', '.join(unsupported)})",
            "convert a Llama (RMSNorm, SwiGLU, RoPE, no biases, llama3, yarn, linear or no RoPE scaling), a Mistral, "
            "Qwen2 or Qwen3 (the same with yarn, linear or no RoPE scaling; Qwen2 with q/k/v biases, Qwen3 with QK "
            "norms), a Phi-3 (partial RoPE too, longrope or no scaling) or a Nemotron (zero-centred LayerNorm, "
            "squared ReLU, partial RoPE, no biases, linear or no scaling) or a Gemma 1 (zero-centred RMSNorm, GeGLU, "
            "scaled embeddings, linear or no scaling), 2 (besides: post-norms, soft-capping, no scaling) or 3 (a "
            "Gemma 2 with QK norms and local RoPE, linear or no scaling)",
        )
    heads = hf["num_attention_heads"]
    share = hf.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) if family.partial_rope else 1.0
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "rotary_base": _integral(rope_theta),
        "share_embeddings_and_output_weights": hf.get("tie_word_embeddings", family.tied),
        "apply_embedding_scaling": family.embedding_scaling,
        "rope_scaling": llama3,
        # what a config.json leaves implicit, too: the family's layers
        "normalization": family.normalization,
        "layernorm_zero_centered_gamma": family.zero_centered,
        "layernorm_epsilon": hf.get("norm_eps", 1e-5) if family == NEMOTRON else hf["rms_norm_eps"],
        "activation": family.activation,
        "add_qkv_bias": family.qkv_bias,
        "qk_layernorm": family.qk_norm,
        "rotary_percent": float(share),
        # no scaling but the one config.json names: a run with another would compute another function
        "rope_short_factor": None,
        "rope_long_factor": None,
        "rope_yarn_factor": None,
        "rope_linear_factor": float(scaling["factor"]) if linear else None,
        "post_sublayer_norms": family.post_norms,
        **dict.fromkeys(GEMMA2_FIELDS),
        **dict(zip(("sliding_window", "window_attn_skip_freq"), _window_fields(hf, family) or (None, None))),
        "rope_local_base_freq": None,
    }
    if family.post_norms:  # Gemma2Config's defaults where config.json names none (the caps may be null; Gemma 3's are)
        caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
        fields.update(
            {name: _number(hf.get(name, None if family.local_rope else default)) for name, default in caps.items()}
        )
        fields["query_pre_attn_scalar"] = int(hf.get("query_pre_attn_scalar", 256))
    if family.local_rope and fields["sliding_window"] is not None:
        fields["rope_local_base_freq"] = _integral(local_theta)
    if llama3:
        fields["rope_scaling_factor"] = float(scaling["factor"])
    if long_rope:
        fields.update(_long_rope_fields(hf, scaling))
    if yarn:
        fields.update(_yarn_fields(hf, scaling))
    return fields


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


# transformers' Phi3Config reads the names Phi-3-mini-128k's first releases used ("su", "yarn") as LongRoPE
_LONG_ROPE_TYPES = ("longrope", "su", "yarn")


def _long_rope_fields(hf: dict, scaling: dict) -> dict:
    """`model.rope_*` of a Phi-3 config.json with LongRoPE, read as transformers 5 reads it: the pretraining length is
    the top-level `original_max_position_embeddings` (Phi3Config's default 4096), the attention factor the one
    named, else from `factor`, else from max_position_embeddings / that length."""
    original = int(hf.get("original_max_position_embeddings", 4096))
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = scaling.get("factor")
        scale = hf["max_position_embeddings"] / original if factor is None else factor
        attention = long_rope_attention_factor(scale, original)
    return {
        "rope_short_factor": [float(factor) for factor in scaling["short_factor"]],
        "rope_long_factor": [float(factor) for factor in scaling["long_factor"]],
        "rope_original_max_positions": original,
        "rope_attention_factor": float(attention),
    }


def check_hf_config(hf: dict, model: ModelConfig, key: str, location: str) -> None:
    """Refuse an HF config.json whose model differs from `model.*`, naming the field and the value to set."""
    fields = hf_model_fields(hf, key, location)
    family = HF_ARCHITECTURES[hf.get("model_type", "llama")]
    current = {
        **{name: getattr(model, name) for name in fields},
        "num_query_groups": model.query_groups,
        "kv_channels": model.head_dim,
    }
    for name, value in fields.items():
        if current[name] != value:
            plain = value.value if isinstance(value, Enum) else value
            written = "null" if plain is None else repr(plain)
            raise ConfigError(
                f"model.{name}",
                current[name].value if isinstance(current[name], Enum) else current[name],
                f"{key}={location} holds an HF {family.name} with {name}={written} (config.json)",
                f"set model.{name}={written}",
            )
    window = unmodelled_window(hf)
    if window is not None and model.max_position_embeddings > window:
        raise ConfigError(
            "model.max_position_embeddings",
            model.max_position_embeddings,
            f"{key}={location} holds an HF {family.name} whose layers attend to the last {window} positions alone "
            "(config.json's sliding_window); steerlm's attend to every position, the same only up to that length",
            f"set model.max_position_embeddings={window} (or less)",
        )


def _yarn_fields(hf: dict, scaling: dict) -> dict:
    """`model.rope_*` of a config.json with YaRN, read as transformers 5 reads it: the pretraining length from
    `rope_scaling` (else max_position_embeddings), the factor named (else max_position_embeddings / that length), the
    attention factor named (else from the factor and DeepSeek's `mscale` / `mscale_all_dim`), betas 32 and 1 unless
    named, `truncate` true unless named."""
    original = int(scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(hf["max_position_embeddings"] / original if factor is None else factor)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = yarn_attention_factor(factor, scaling.get("mscale"), scaling.get("mscale_all_dim"))
    return {
        "rope_yarn_factor": factor,
        "rope_yarn_beta_fast": float(scaling.get("beta_fast") or 32.0),
        "rope_yarn_beta_slow": float(scaling.get("beta_slow") or 1.0),
        "rope_yarn_truncate": bool(scaling.get("truncate", True)),
        "rope_original_max_positions": original,
        "rope_attention_factor": float(attention),
    }
