"""Hugging Face Llama / Nemotron / Qwen2 / Qwen3 / Mistral / Phi-3 / Gemma / Gemma 2 / Gemma 3 <-> megatron GPTModel:
configuration and full (unsharded) weight mapping.

Nine HF architectures compute exactly what a steerlm model can (`HF_ARCHITECTURES`): Llama (RMSNorm, SwiGLU, RoPE on
every channel, optionally Llama-3.1's frequency scaling), Nemotron (NVIDIA's Nemotron-3/4 and Minitron: LayerNorm
whose weights are stored centred on zero — `model.layernorm_zero_centered_gamma`, NeMo's `layernorm1p` —, squared-ReLU
MLP, RoPE on a share of each head's channels), Qwen2 (a Llama with biases on q/k/v_proj: `model.add_qkv_bias`), Qwen3
(a Llama with an RMSNorm of each query and key head before RoPE, `q_norm` / `k_norm`: `model.qk_layernorm`),
Mistral (a Llama whose layers may attend to a sliding window: imported with that many positions, exported as the
Llama it computes) and Phi-3 (Phi-3, Phi-3.5, Phi-4 and Phi-4-mini: a Llama, or one with RoPE on a share of each head,
or with LongRoPE's per-channel factors — `model.rope_short_factor` … —, whose q/k/v and gate/up projections are
stored fused; exported as the Llama it computes where RoPE covers every channel without LongRoPE), Gemma (1: a Llama
with a GELU-gated MLP, zero-centred RMSNorm weights and input embeddings times sqrt(hidden_size) —
`model.activation=geglu`, `model.apply_embedding_scaling`), Gemma 2 (a Gemma with norms of each sublayer's output
and soft-capping: `model.post_sublayer_norms`, `model.attn_logit_softcapping` …) and Gemma 3's text model (a Gemma 2
with QK norms whose sliding-window layers rotate with their own RoPE base: `model.rope_local_base_freq`). Every family
but Nemotron, Phi-3 and the Gemmas may carry YaRN (`model.rope_yarn_factor` …), every family but Phi-3 and Gemma 2
linear scaling (`model.rope_linear_factor`); the three scalings' frequencies: `steerlm.models.rope`.
`hf_architecture` tells which a `ModelConfig` is exported as.

Megatron packs attention as one `linear_qkv` whose rows (and Qwen2's biases) are grouped per query group
([q heads of the group, k, v] x groups) and the SwiGLU MLP as one `linear_fc1` = [gate; up]; HF keeps
separate q/k/v and gate/up projections (Nemotron's `up_proj` is the ungated `linear_fc1` as it is; Phi-3's
`qkv_proj` holds [all q heads; all k; all v] and its `gate_up_proj` is `linear_fc1` as it is). Both use
non-interleaved ("rotate half") RoPE, so no permutation of heads is needed. Vocabulary padding rows are dropped on
export and added as zeros on import (they are never looked up; as output rows they give logit 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from steerlm.config.schema import HF_CONFIG_FILE, Activation, ModelConfig, Normalization, PositionEmbedding
from steerlm.megatron_compat import pack_qkv, split_fc1, split_qkv
from steerlm.models.rope import long_rope_attention_factor, yarn_attention_factor
from steerlm.models.sharding import TIED_EMBEDDING

# Per-layer tensors that map one to one in every architecture: megatron name (after `decoder.layers.N.`) → HF name
# (after `model.layers.N.`); `_layer_copies` adds a LayerNorm's biases, an ungated fc1 and Qwen3's QK norms.
_LAYER_COPIES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_BIAS_COPIES = {
    "input_layernorm.bias": "input_layernorm.bias",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
}
_UNGATED_FC1 = {"mlp.linear_fc1.weight": "mlp.up_proj.weight"}
# Gemma 2's norms: of the attention's output (HF's `post_attention_layernorm`, Llama's name for the MLP's input norm),
# of the MLP's input and of its output
_POST_NORMS = {
    "post_self_attn_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_layernorm.weight": "post_feedforward_layernorm.weight",
}
_QK_NORMS = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# The final norm: megatron name → HF name (the bias a LayerNorm's alone).
_FINAL_NORM = {"decoder.final_layernorm.weight": "model.norm.weight", "decoder.final_layernorm.bias": "model.norm.bias"}
# The fixed parameters of megatron's Llama-3 RoPE scaling (only the factor is configurable: model.rope_scaling_factor).
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# The regression APM's head (steerlm.models.attribute) and the tensor HF's LlamaForSequenceClassification keeps it in.
HEAD_WEIGHT, HEAD_BIAS = "attribute_head.weight", "attribute_head.bias"
SCORE_WEIGHT = "score.weight"
# Where an export sets aside the vocabulary padding rows HF has no place for (`vocab_padding`), so that an
# import restores them instead of zeros: `padding/<megatron name>`.
PADDING_PREFIX = "padding/"
_VOCABULARY = (TIED_EMBEDDING, "output_layer.weight")


@dataclass(frozen=True)
class HFArchitecture:
    """An HF model family a steerlm model maps to exactly: its name, `model_type`, its two classes, and the layers
    it is built from (what `model.*` must say for the mapping to compute the same function)."""

    name: str
    model_type: str
    causal_lm: str
    sequence_classifier: str  # a regression APM: the head is `score`
    normalization: Normalization = Normalization.RMSNorm
    zero_centered: bool = False  # norm weights stored centred on zero (`model.layernorm_zero_centered_gamma`)
    activation: Activation = Activation.swiglu
    hidden_act: str = "silu"  # config.json's name of `activation`
    qkv_bias: bool = False  # biases on q/k/v_proj alone (`model.add_qkv_bias`)
    qk_norm: bool = False  # a norm of each query and key head, `q_norm` / `k_norm` (`model.qk_layernorm`)
    partial_rope: bool = False  # RoPE on a share of each head (`partial_rotary_factor`); else on every channel
    llama3_rope: bool = False  # Llama-3.1's frequency scaling may be on (`rope_scaling.rope_type: llama3`)
    exported: bool = True  # steerlm writes this family (Mistral computes what a Llama does: it is exported as one)
    fused: bool = False  # q/k/v in one `qkv_proj` ([q; k; v]) and gate/up in one `gate_up_proj` ([gate; up])
    long_rope: bool = False  # LongRoPE's per-channel factors may be on (`rope_scaling.type: longrope`)
    yarn: bool = True  # YaRN may be on (`rope_scaling.rope_type: yarn`); Phi-3 reads that name as LongRoPE's
    linear: bool = True  # linear scaling may be on (`rope_scaling.rope_type: linear`); Phi3Config takes longrope alone
    embedding_scaling: bool = False  # input embeddings times sqrt(hidden_size) (`model.apply_embedding_scaling`)
    legacy_acts: tuple[str, ...] = ()  # other `hidden_act` values transformers reads as `hidden_act`
    tied: bool = False  # what a config.json without `tie_word_embeddings` means (the config class's default)
    post_norms: bool = False  # Gemma 2's norms of each sublayer's output; its soft-capping and attention scale too
    sliding: bool = False  # layers may attend to a sliding window (`model.sliding_window`); else it limits positions
    window_skip: int | None = None  # which layers slide (`model.window_attn_skip_freq`): Gemma 2's every other one
    # the sliding layers rotate with their own base (`model.rope_local_base_freq`), config.json names which layers
    # slide by a pattern (`sliding_window_pattern`: any `window_attn_skip_freq`): Gemma 3's
    local_rope: bool = False


LLAMA = HFArchitecture("Llama", "llama", "LlamaForCausalLM", "LlamaForSequenceClassification", llama3_rope=True)
NEMOTRON = HFArchitecture(
    "Nemotron",
    "nemotron",
    "NemotronForCausalLM",
    "NemotronForSequenceClassification",
    normalization=Normalization.LayerNorm,
    zero_centered=True,
    activation=Activation.squared_relu,
    hidden_act="relu2",
    partial_rope=True,
    yarn=False,
)
QWEN2 = HFArchitecture("Qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", qkv_bias=True)
QWEN3 = HFArchitecture("Qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", qk_norm=True)
# Exported where no family before it computes the model: one whose every layer attends to a sliding window
MISTRAL = HFArchitecture("Mistral", "mistral", "MistralForCausalLM", "MistralForSequenceClassification", sliding=True)
# Exported only where no family before it computes the model (RoPE on a share of each head with SwiGLU, or LongRoPE):
# `hf_architecture` takes the first that does, so a Phi-3 with plain RoPE on every channel goes out as the Llama it is.
PHI3 = HFArchitecture(
    "Phi3",
    "phi3",
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    partial_rope=True,
    fused=True,
    long_rope=True,
    yarn=False,
    linear=False,
    sliding=True,
)
# Gemma (1: Gemma-2B/7B, CodeGemma): a Llama with a GELU-gated MLP (tanh approximation; its first configs say
# `gelu`, which transformers reads as the approximation), RMSNorm weights stored centred on zero and input embeddings
# times sqrt(hidden_size). Gemma 2 and 3 add layers steerlm lacks (post-norms, soft-capping, sliding windows).
GEMMA = HFArchitecture(
    "Gemma",
    "gemma",
    "GemmaForCausalLM",
    "GemmaForSequenceClassification",
    zero_centered=True,
    activation=Activation.geglu,
    hidden_act="gelu_pytorch_tanh",
    yarn=False,
    embedding_scaling=True,
    legacy_acts=("gelu",),
    tied=True,
)
# Gemma 2 (2B, 9B, 27B): a Gemma with norms of each sublayer's output, soft-capped attention scores and logits and the
# attention scale query_pre_attn_scalar ** -0.5. Its even layers (from 0) attend to a sliding window
# (`model.window_attn_skip_freq: 2`).
GEMMA2 = replace(
    GEMMA,
    name="Gemma2",
    model_type="gemma2",
    causal_lm="Gemma2ForCausalLM",
    sequence_classifier="Gemma2ForSequenceClassification",
    linear=False,
    post_norms=True,
    sliding=True,
    window_skip=2,
)
# Gemma 3 (Gemma-3-1B, and the text model of the 4B, 12B and 27B): a Gemma 2 with norms of each query and key head
# (zero-centred, as its other norms), no caps unless config.json names them, five of each six layers attending to a
# sliding window (`model.window_attn_skip_freq: 6`) and rotating with plain RoPE of their own base
# (`model.rope_local_base_freq`), the others with `rope_theta` and the linear scaling the 4B+ have.
GEMMA3 = replace(
    GEMMA2,
    name="Gemma3",
    model_type="gemma3_text",
    causal_lm="Gemma3ForCausalLM",
    sequence_classifier="Gemma3TextForSequenceClassification",
    qk_norm=True,
    linear=True,
    window_skip=6,
    local_rope=True,
)
HF_ARCHITECTURES = {
    family.model_type: family for family in (LLAMA, NEMOTRON, QWEN2, QWEN3, MISTRAL, PHI3, GEMMA, GEMMA2, GEMMA3)
}
GEMMA2_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")


def sliding_layers(num_layers: int, skip: int | None) -> list[bool]:
    """Which layers of a windowed model slide: all, or all but every `skip`-th counted from 1 (megatron's
    `window_attn_skip_freq`, as its `is_layer_window_attention` reads it)."""
    return [skip is None or (layer + 1) % skip != 0 for layer in range(num_layers)]


def _problems(model: ModelConfig, family: HFArchitecture) -> list[str]:
    """What `family` cannot express of `model` (the mapping would silently be wrong)."""
    wanted = {
        "normalization": family.normalization,
        "layernorm_zero_centered_gamma": family.zero_centered,
        "activation": family.activation,
        "apply_embedding_scaling": family.embedding_scaling,
        "post_sublayer_norms": family.post_norms,
        "position_embedding_type": PositionEmbedding.rope,
        "add_bias_linear": False,
        "add_qkv_bias": family.qkv_bias,
        "qk_layernorm": family.qk_norm,
    }
    problems = [
        f"{name} must be {value.value if isinstance(value, Enum) else str(value).lower()}"
        for name, value in wanted.items()
        if getattr(model, name) != value
    ]
    if not family.partial_rope and model.rotary_percent != 1.0:
        problems.append("rotary_percent must be 1.0")
    if not family.llama3_rope and model.rope_scaling:
        problems.append("rope_scaling must be false")
    if not family.long_rope and model.long_rope:
        problems.append("rope_short_factor and rope_long_factor must be null (LongRoPE)")
    if not family.yarn and model.rope_yarn_factor is not None:
        problems.append("rope_yarn_factor must be null (YaRN)")
    if not family.linear and model.rope_linear_factor is not None:
        problems.append("rope_linear_factor must be null (linear scaling)")
    if not family.post_norms:
        problems += [f"{name} must be null" for name in GEMMA2_FIELDS if getattr(model, name) is not None]
    if model.sliding_window is not None and not family.sliding:
        problems.append("sliding_window must be null")
    elif model.sliding_window is not None and family.local_rope:  # any pattern, and the sliding layers' own RoPE
        if model.window_attn_skip_freq is None:
            problems.append("window_attn_skip_freq must be set (every N-th layer attends to every position)")
        if model.rope_local_base_freq is None:
            problems.append("rope_local_base_freq must be set (the sliding layers' RoPE base)")
    elif model.sliding_window is not None and model.window_attn_skip_freq != family.window_skip:
        problems.append(f"window_attn_skip_freq must be {family.window_skip or 'null'}")
    if model.rope_local_base_freq is not None and not family.local_rope:
        problems.append("rope_local_base_freq must be null")
    return problems


def hf_architecture(model: ModelConfig) -> HFArchitecture:
    """The HF architecture steerlm exports `model` as (the one that computes what it computes); ValueError naming
    what none can express."""
    exported = [family for family in HF_ARCHITECTURES.values() if family.exported]
    found = {family.name: _problems(model, family) for family in exported}
    for family in exported:
        if not found[family.name]:
            return family
    raise ValueError(
        f"model {model.name!r} is not an HF "
        + " nor an HF ".join(f"{name} ({'; '.join(problems)})" for name, problems in found.items())
    )


def hf_config_dict(model: ModelConfig) -> dict:
    """The `config.json` fields of the HF causal LM (`hf_architecture`) with this shape."""
    family = hf_architecture(model)
    config: dict[str, Any] = {
        "architectures": [family.causal_lm],
        "model_type": family.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": float(model.rotary_base),
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "hidden_act": family.hidden_act,
    }
    if family in (QWEN2, QWEN3):  # every layer attends to every position
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.num_layers)
    if family != QWEN2:  # Qwen2's q/k/v biases are the architecture's, no key
        config.update(attention_bias=False, mlp_bias=False)
    if model.rope_linear_factor is not None:  # as DeepSeek-Coder's config.json (transformers 4 reads `type`)
        config["rope_scaling"] = {"type": "linear", "factor": model.rope_linear_factor}
        if family == GEMMA3:  # as Gemma-3-4B's (transformers 5 adds it to the full-attention layers' `rope_type`)
            config["rope_scaling"] = {"rope_type": "linear", "factor": model.rope_linear_factor}
    if family == NEMOTRON:  # transformers 4's keys, which 5 reads into `rope_parameters` too
        config.update(norm_eps=model.layernorm_epsilon, partial_rotary_factor=model.rotary_percent)
        return config
    if family in (GEMMA, GEMMA2, GEMMA3):  # transformers 4's GemmaConfig (and vLLM) read the MLP's activation here
        config["hidden_activation"] = family.hidden_act
    if family in (GEMMA2, GEMMA3):  # without a window: one as long as the model's positions, every layer full attention
        config.update({name: getattr(model, name) for name in GEMMA2_FIELDS})
        config["query_pre_attn_scalar"] = model.query_pre_attn_scalar or model.head_dim
        window, skip = model.sliding_window, model.window_attn_skip_freq
        slides = sliding_layers(model.num_layers, skip) if window is not None else [False] * model.num_layers
        config["sliding_window"] = window or model.max_position_embeddings
        config["layer_types"] = ["sliding_attention" if slide else "full_attention" for slide in slides]
    if family == GEMMA3:  # transformers 4's names, which 5 reads into `rope_parameters` per layer type too
        config.update(rope_local_base_freq=float(model.rope_local_base_freq or model.rotary_base))
        config.update(use_bidirectional_attention=False)
        if model.window_attn_skip_freq is not None:
            config["sliding_window_pattern"] = model.window_attn_skip_freq
    if family == MISTRAL:
        config["sliding_window"] = model.sliding_window
    if family == PHI3:  # Phi3Config's default pad id is Phi-3's 32000, outside other vocabularies: none unless given
        config.update(
            partial_rotary_factor=model.rotary_percent, sliding_window=model.sliding_window, pad_token_id=None
        )
    config["rms_norm_eps"] = model.layernorm_epsilon
    if model.long_rope:
        config.update(_long_rope_config(model))
    if model.rope_yarn_factor is not None:
        config["rope_scaling"] = _yarn_config(model)
    if model.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_SCALING}
    return config


def _long_rope_config(model: ModelConfig) -> dict:
    """config.json's LongRoPE keys as Phi-3.5 and Phi-4-mini ship them (`rope_scaling` of exactly `type`,
    `short_factor` and `long_factor`, which transformers 4's Phi3Config requires), plus `attention_factor` when
    `max_position_embeddings / original_max_position_embeddings` does not give it (transformers 5 reads it)."""
    scaling: dict[str, Any] = {
        "type": "longrope",
        "short_factor": list(model.rope_short_factor or ()),
        "long_factor": list(model.rope_long_factor or ()),
    }
    original = model.rope_original_max_positions
    if model.rope_attention_factor != long_rope_attention_factor(model.max_position_embeddings / original, original):
        scaling["attention_factor"] = model.rope_attention_factor
    return {"original_max_position_embeddings": original, "rope_scaling": scaling}


def _yarn_config(model: ModelConfig) -> dict:
    """config.json's `rope_scaling` of a YaRN model as Qwen's model cards write it (`rope_type`, `factor`,
    `original_max_position_embeddings`), the rest only where it is not transformers' default (vLLM reads
    `beta_fast`/`beta_slow`, not `truncate` or `attention_factor`)."""
    factor = model.rope_yarn_factor
    assert factor is not None
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": model.rope_original_max_positions,
    }
    for key, value, default in (
        ("beta_fast", model.rope_yarn_beta_fast, 32.0),
        ("beta_slow", model.rope_yarn_beta_slow, 1.0),
        ("truncate", model.rope_yarn_truncate, True),
        ("attention_factor", model.rope_attention_factor, yarn_attention_factor(factor)),
    ):
        if value != default:
            scaling[key] = value
    return scaling


_QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")  # the bias: Qwen2's
# Phi-3's fused projections (after `model.layers.N.`; the q/k/v one without `.weight`, as `_QKV`'s kinds follow it)
_FUSED_QKV, _FUSED_FC1 = "self_attn.qkv_proj", "mlp.gate_up_proj.weight"


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    return split_qkv(qkv, model.num_attention_heads, model.query_groups, model.head_dim)


def _layer_copies(model: ModelConfig) -> dict[str, str]:
    """Per-layer tensors `model` maps one to one (megatron name after `decoder.layers.N.` → HF name)."""
    copies = dict(_LAYER_COPIES)
    if model.normalization == Normalization.LayerNorm:
        copies.update(_BIAS_COPIES)
    if not model.gated_mlp:
        copies.update(_UNGATED_FC1)
    if model.qk_layernorm:
        copies.update(_QK_NORMS)
    if model.post_sublayer_norms:
        copies.update(_POST_NORMS)
    return copies


def _final_norm(model: ModelConfig) -> dict[str, str]:
    return dict(list(_FINAL_NORM.items())[: 2 if model.normalization == Normalization.LayerNorm else 1])


def megatron_to_hf_tensors(name: str, tensor: torch.Tensor, model: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors (name, view) one full megatron tensor becomes; KeyError for a name HF has no place for.

    An APM's `attribute_head.weight` becomes LlamaForSequenceClassification's `score.weight`; its bias has no
    HF tensor (the caller decides where it goes). Works on meta tensors, so a plan needs no weights.
    """
    vocab = model.vocab_size
    if name == TIED_EMBEDDING:
        return [("model.embed_tokens.weight", tensor[:vocab])]
    if name == "output_layer.weight":
        return [("lm_head.weight", tensor[:vocab])]
    final = _final_norm(model)
    if name in final:
        return [(final[name], tensor)]
    if name == HEAD_WEIGHT:
        return [(SCORE_WEIGHT, tensor)]
    match = _LAYER.match(name)
    rest = match.group(2) if match else ""
    prefix = f"model.layers.{match.group(1)}." if match else ""
    copies = _layer_copies(model)
    if rest in copies:
        return [(prefix + copies[rest], tensor)]
    fused = hf_architecture(model).fused
    if rest in _QKV:
        q, k, v = _split_qkv(tensor, model)
        kind = rest.rsplit(".", 1)[1]
        if fused:
            return [(f"{prefix}{_FUSED_QKV}.{kind}", torch.cat([q, k, v]))]
        return [(f"{prefix}self_attn.{part}_proj.{kind}", value) for part, value in zip("qkv", (q, k, v))]
    if rest == "mlp.linear_fc1.weight":
        if fused:
            return [(prefix + _FUSED_FC1, tensor)]
        gate, up = split_fc1(tensor)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise KeyError(f"an HF {hf_architecture(model).name} has no tensor for megatron parameter {name!r}")


# What PEFT adapts in an HF Llama for each megatron layer steerlm adapts: a fused megatron layer is several HF
# projections, which share its A (the same input) and split its B's rows like the weight's.
_LORA_PROJECTIONS = {
    "linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attn", ("o_proj",)),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", ("down_proj",)),
}


_FUSED_LORA_PROJECTIONS = {
    **_LORA_PROJECTIONS,
    "linear_qkv": ("self_attn", ("qkv_proj",)),
    "linear_fc1": ("mlp", ("gate_up_proj",)),
}


def lora_projections(model: ModelConfig, fused: bool | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per adapted megatron layer: the HF module it sits in and the projections PEFT adapts there (an ungated fc1
    is `up_proj` alone). `fused`: whether the HF model stores q/k/v and gate/up fused (a Phi-3's `qkv_proj` and
    `gate_up_proj`); None: as the family `model` is exported as does."""
    if _exported_fused(model) if fused is None else fused:
        return _FUSED_LORA_PROJECTIONS
    return _LORA_PROJECTIONS if model.gated_mlp else {**_LORA_PROJECTIONS, "linear_fc1": ("mlp", ("up_proj",))}


def _exported_fused(model: ModelConfig) -> bool:
    """Whether `model` exports as an HF family with fused projections (False for a shape no family computes)."""
    try:
        return hf_architecture(model).fused
    except ValueError:
        return False


PEFT_PREFIX = "base_model.model."  # PEFT's name of the wrapped LlamaForCausalLM in adapter_model.safetensors


LAYERS = "model.layers"  # where a causal LM's decoder layers sit (HF module path)
MULTIMODAL_LAYERS = "model.language_model.layers"  # a Gemma3ForConditionalGeneration's (transformers 4.52+)


def megatron_lora_to_peft_tensors(
    name: str, tensor: torch.Tensor, model: ModelConfig, fused: bool | None = None, layers: str = LAYERS
) -> list[tuple[str, torch.Tensor]]:
    """The PEFT adapter tensors (name as `adapter_model.safetensors` holds it, view) of one full adapter matrix
    `decoder.layers.N.<parent>.<linear>.lora_a|lora_b` (steerlm.models.lora); `fused` as `lora_projections`;
    `layers` the base model's module path of its decoder layers (`base_layers`)."""
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"{name!r} is not a layer's adapter")
    module, matrix = match.group(2).rsplit(".", 1)
    linear = module.rsplit(".", 1)[-1]
    parent, projections = lora_projections(model, fused)[linear]
    if matrix == "lora_a":
        parts: tuple[torch.Tensor, ...] = (tensor,) * len(projections)
    elif linear == "linear_qkv":
        parts = _split_qkv(tensor, model)
        if len(projections) == 1:  # Phi-3's qkv_proj: [q; k; v]
            parts = (torch.cat(parts),)
    elif linear == "linear_fc1" and len(projections) == 2:  # gate_proj, up_proj (gate_up_proj is fc1's layout)
        parts = split_fc1(tensor)
    else:
        parts = (tensor,)
    which = "lora_A" if matrix == "lora_a" else "lora_B"
    prefix = f"{PEFT_PREFIX}{layers}.{match.group(1)}.{parent}"
    return [(f"{prefix}.{projection}.{which}.weight", part) for projection, part in zip(projections, parts)]


def vocab_padding(name: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor | None:
    """The padding rows (beyond `model.vocab_size`) of a vocabulary parameter, which HF tensors drop; None for
    other parameters or an unpadded vocabulary."""
    if name not in _VOCABULARY or model.padded_vocab_size == model.vocab_size:
        return None
    return tensor[model.vocab_size :]


def megatron_to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Map full megatron tensors (keyed by global name) to the HF causal LM's state-dict tensors."""
    hf_architecture(model)
    return {
        hf_name: tensor.contiguous()
        for name in megatron_names(model)
        for hf_name, tensor in megatron_to_hf_tensors(name, full[name], model)
    }


def megatron_names(model: ModelConfig) -> list[str]:
    """Global names of the GPTModel's parameters (megatron's local layer spec), as `megatron_to_hf` reads
    them: the embedding, the layers in order, the final norm and (untied) the output layer."""
    fused = [*_QKV[: 2 if model.add_qkv_bias else 1], "mlp.linear_fc1.weight"]
    per_layer = list(dict.fromkeys([*_layer_copies(model), *fused]))  # an ungated fc1 is a copy already
    layers = [f"decoder.layers.{layer}.{name}" for layer in range(model.num_layers) for name in per_layer]
    output = [] if model.share_embeddings_and_output_weights else ["output_layer.weight"]
    return [TIED_EMBEDDING, *layers, *_final_norm(model), *output]


def megatron_shapes(model: ModelConfig, num_attributes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Full shapes of the parameters `megatron_names` lists (plus an APM's head with `num_attributes`), in that
    order: what an export plans its files from before any weight is read."""
    h, ffn, vocab = model.hidden_size, model.ffn_hidden_size, model.padded_vocab_size
    attention = model.num_attention_heads * model.head_dim
    per_layer = {
        "self_attention.linear_proj.weight": (h, attention),
        "mlp.linear_fc2.weight": (h, ffn),
        "self_attention.linear_qkv.weight": (attention + 2 * model.query_groups * model.head_dim, h),
        "self_attention.linear_qkv.bias": (attention + 2 * model.query_groups * model.head_dim,),
        **dict.fromkeys(_QK_NORMS, (model.head_dim,)),
        "mlp.linear_fc1.weight": ((2 if model.gated_mlp else 1) * ffn, h),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name in megatron_names(model):
        match = _LAYER.match(name)
        if match:
            shapes[name] = per_layer.get(match.group(2), (h,))  # the rest are norms' weights and biases
        else:
            shapes[name] = (h,) if name in _FINAL_NORM else (vocab, h)
    if num_attributes is not None:
        shapes.update({HEAD_WEIGHT: (num_attributes, h), HEAD_BIAS: (num_attributes,)})
    return shapes


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor], model: ModelConfig, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Full megatron tensors (keyed by global name) from HF LlamaForCausalLM tensors: `megatron_to_hf`'s inverse.

    q/k/v are re-packed into `linear_qkv` per query group, gate/up into `linear_fc1`, and the vocabulary rows
    padded with zeros to `model.padded_vocab_size`. `names` limits the result to some global names (one
    pipeline stage's); `hf_state` is only indexed for the tensors those need, so it may read lazily from disk.
    """
    return dict(MegatronFromHF(hf_state, model, names))


class MegatronFromHF(Mapping[str, torch.Tensor]):
    """`hf_to_megatron` computed on access: each full megatron tensor is built from the HF tensors when it is
    looked up, so loading a model through it holds one full tensor at a time (not a second copy of the model).
    An APM's `attribute_head.weight` comes from `score.weight`; its bias is not an HF tensor. Vocabulary
    padding rows are zeros unless the state holds them under `padding/<name>` (`vocab_padding`)."""

    def __init__(self, hf_state: Mapping[str, torch.Tensor], model: ModelConfig, names: Iterable[str] | None = None):
        hf_architecture(model)
        self._hf, self._model = hf_state, model
        self._names = list(megatron_names(model) if names is None else names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(f"megatron parameter {name!r} was not asked of this HF state")
        tensor = _from_hf(name, self._hf, self._model).contiguous()
        if name in _VOCABULARY and PADDING_PREFIX + name in self._hf:  # rows an export of steerlm's set aside
            tensor[self._model.vocab_size :] = self._hf[PADDING_PREFIX + name]
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _from_hf(name: str, hf: Mapping[str, torch.Tensor], model: ModelConfig) -> torch.Tensor:
    if name == TIED_EMBEDDING:
        return _pad_vocab(hf["model.embed_tokens.weight"], model)
    if name == "output_layer.weight":
        return _pad_vocab(hf["lm_head.weight"], model)
    final = _final_norm(model)
    if name in final:
        return hf[final[name]]
    if name == HEAD_WEIGHT:
        return hf[SCORE_WEIGHT]
    match = _LAYER.match(name)
    missing = f"an HF {hf_architecture(model).name} has no tensor for megatron parameter {name!r}"
    if match is None:
        raise KeyError(missing)
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    copies = _layer_copies(model)
    if rest in copies:
        return hf[prefix + copies[rest]]
    if rest in _QKV:
        kind = rest.rsplit(".", 1)[1]
        fused = f"{prefix}{_FUSED_QKV}.{kind}"
        if fused in hf:  # a Phi-3's [q; k; v]
            query, group = model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim
            q, k, v = hf[fused].split([query, group, group])
        else:
            q, k, v = (hf[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv")
        return _pack_qkv(q, k, v, model)
    if rest == "mlp.linear_fc1.weight":
        if prefix + _FUSED_FC1 in hf:  # a Phi-3's [gate; up]: megatron's layout
            return hf[prefix + _FUSED_FC1]
        return torch.cat([hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"]])
    raise KeyError(missing)


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    return pack_qkv(q, k, v, model.num_attention_heads, model.query_groups, model.head_dim)


def _pad_vocab(rows: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    if rows.shape[0] != model.vocab_size:
        raise ValueError(f"HF vocabulary tensor has {rows.shape[0]} rows, model.vocab_size is {model.vocab_size}")
    return torch.cat([rows, rows.new_zeros(model.padded_vocab_size - model.vocab_size, rows.shape[1])])


# Where a Gemma3ForConditionalGeneration keeps its language model's tensors (transformers 4.52+, and the layout Google's
# checkpoints were first written in): read as a Gemma3ForCausalLM's `model.*` (its `lm_head.weight`, where one is
# stored, keeps its name).
_TEXT_MODEL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def _text_model_name(stored: str) -> str | None:
    """A multimodal checkpoint's tensor name as its language model's; None for the rest (vision tower, projector)."""
    for prefix, replacement in _TEXT_MODEL_PREFIXES:
        if stored.startswith(prefix):
            return replacement + stored[len(prefix) :]
    return stored if stored.startswith("lm_head.") else None


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The tensors of a directory's `*.safetensors` files (one or sharded), read from disk on access; `more`
    directories add theirs (an export's set-aside tensors under `steerlm/`). A multimodal Gemma 3's are its language
    model's under a Gemma3ForCausalLM's names; the others (its vision tower and projector) are listed in `left_out`."""

    def __init__(self, directory: Path, *more: Path) -> None:
        self._directory = Path(directory)
        self._files: dict[str, tuple[Path, str]] = {}  # name → (file, the name it is stored under)
        for folder in (directory, *more):
            for file in sorted(Path(folder).glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self._files.update({key: (file, key) for key in handle.keys()})
        self.left_out: list[str] = []
        prefixes = tuple(prefix for prefix, _ in _TEXT_MODEL_PREFIXES)
        if "model.embed_tokens.weight" not in self._files and any(key.startswith(prefixes) for key in self._files):
            stored, self._files = self._files, {}
            for key, (file, _) in stored.items():
                name = _text_model_name(key)
                if name is None:
                    self.left_out.append(key)
                else:
                    self._files[name] = (file, key)

    def __contains__(self, name: object) -> bool:
        return name in self._files  # without reading the tensor, as Mapping's own would

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"no tensor {name!r} in the *.safetensors files of {self._directory}")
        file, stored = self._files[name]
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


# Gemma3TextConfig's defaults (transformers 4.50 to 5.25), which the `text_config` of a Gemma3ForConditionalGeneration
# leaves out where it keeps them (Gemma-3-4B's names its sizes, layers, window and RoPE scaling alone)
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}
MULTIMODAL_GEMMA3 = "gemma3"  # Gemma3ForConditionalGeneration's model_type


def base_layers(directory: Path) -> str:
    """The module path of the decoder layers of the HF model in `directory`: a multimodal Gemma 3's sit in its
    language model (`MULTIMODAL_LAYERS`), which PEFT's adapters on that base must name."""
    raw = json.loads((Path(directory) / HF_CONFIG_FILE).read_text())
    return MULTIMODAL_LAYERS if raw.get("model_type") == MULTIMODAL_GEMMA3 else LAYERS


def read_hf_config(directory: Path) -> dict:
    """A directory's config.json; a Gemma3ForConditionalGeneration's is its language model's, a Gemma3ForCausalLM's
    config (`text_config` with Gemma3TextConfig's defaults; `SafetensorsWeights` reads its tensors by those
    names)."""
    hf = json.loads((Path(directory) / HF_CONFIG_FILE).read_text())
    if hf.get("model_type") != MULTIMODAL_GEMMA3:
        return hf
    text = {**_GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    dtype = hf.get("torch_dtype") or hf.get("dtype") or text.get("torch_dtype") or text.get("dtype")
    return {**text, "model_type": GEMMA3.model_type, "architectures": [GEMMA3.causal_lm], "torch_dtype": dtype}
