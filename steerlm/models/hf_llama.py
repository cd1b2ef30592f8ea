"""Hugging Face Llama <-> megatron GPTModel: configuration and full (unsharded) weight mapping.

Megatron packs attention as one `linear_qkv` whose rows are grouped per query group
([q heads of the group, k, v] x groups) and the SwiGLU MLP as one `linear_fc1` = [gate; up]; HF keeps
separate q/k/v and gate/up projections. Both use non-interleaved ("rotate half") RoPE, so no
permutation of heads is needed. Vocabulary padding rows are dropped on export and added as zeros on
import (they are never looked up; as output rows they give logit 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from steerlm.config.schema import HF_CONFIG_FILE, Activation, ModelConfig, Normalization, PositionEmbedding
from steerlm.errors import ConfigError
from steerlm.megatron_compat import pack_qkv, split_fc1, split_qkv
from steerlm.models.sharding import TIED_EMBEDDING

# Per-layer tensors that map one to one: megatron name (after `decoder.layers.N.`) → HF name (after `model.layers.N.`).
_LAYER_COPIES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
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


def hf_config_dict(model: ModelConfig) -> dict:
    """The `config.json` fields of an HF LlamaForCausalLM with this shape."""
    check_llama(model)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.layernorm_epsilon,
        "rope_theta": float(model.rotary_base),
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if model.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_SCALING}
    return config


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    return split_qkv(qkv, model.num_attention_heads, model.query_groups, model.head_dim)


def check_llama(model: ModelConfig) -> None:
    """Refuse shapes that HF's Llama cannot express (the mapping would silently be wrong)."""
    problems = []
    if model.normalization != Normalization.RMSNorm:
        problems.append("normalization must be RMSNorm")
    if model.activation != Activation.swiglu:
        problems.append("activation must be swiglu")
    if model.position_embedding_type != PositionEmbedding.rope:
        problems.append("position_embedding_type must be rope")
    if model.rotary_percent != 1.0:
        problems.append("rotary_percent must be 1.0")
    if model.add_bias_linear:
        problems.append("add_bias_linear must be false")
    if problems:
        raise ValueError(f"model {model.name!r} is not an HF Llama: " + "; ".join(problems))


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
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    if name == HEAD_WEIGHT:
        return [(SCORE_WEIGHT, tensor)]
    match = _LAYER.match(name)
    rest = match.group(2) if match else ""
    prefix = f"model.layers.{match.group(1)}." if match else ""
    if rest in _LAYER_COPIES:
        return [(prefix + _LAYER_COPIES[rest], tensor)]
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = _split_qkv(tensor, model)
        return [(f"{prefix}self_attn.{part}_proj.weight", value) for part, value in zip("qkv", (q, k, v))]
    if rest == "mlp.linear_fc1.weight":
        gate, up = split_fc1(tensor)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise KeyError(f"an HF Llama has no tensor for megatron parameter {name!r}")


# What PEFT adapts in an HF Llama for each megatron layer steerlm adapts: a fused megatron layer is several HF
# projections, which share its A (the same input) and split its B's rows like the weight's.
LORA_PROJECTIONS = {
    "linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attn", ("o_proj",)),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", ("down_proj",)),
}
PEFT_PREFIX = "base_model.model."  # PEFT's name of the wrapped LlamaForCausalLM in adapter_model.safetensors


def megatron_lora_to_peft_tensors(
    name: str, tensor: torch.Tensor, model: ModelConfig
) -> list[tuple[str, torch.Tensor]]:
    """The PEFT adapter tensors (name as `adapter_model.safetensors` holds it, view) of one full adapter matrix
    `decoder.layers.N.<parent>.<linear>.lora_a|lora_b` (steerlm.models.lora)."""
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"{name!r} is not a layer's adapter")
    module, matrix = match.group(2).rsplit(".", 1)
    linear = module.rsplit(".", 1)[-1]
    parent, projections = LORA_PROJECTIONS[linear]
    if matrix == "lora_a":
        parts: tuple[torch.Tensor, ...] = (tensor,) * len(projections)
    elif linear == "linear_qkv":
        parts = _split_qkv(tensor, model)
    elif linear == "linear_fc1":
        parts = split_fc1(tensor)
    else:
        parts = (tensor,)
    which = "lora_A" if matrix == "lora_a" else "lora_B"
    prefix = f"{PEFT_PREFIX}model.layers.{match.group(1)}.{parent}"
    return [(f"{prefix}.{projection}.{which}.weight", part) for projection, part in zip(projections, parts)]


def vocab_padding(name: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor | None:
    """The padding rows (beyond `model.vocab_size`) of a vocabulary parameter, which HF tensors drop; None for
    other parameters or an unpadded vocabulary."""
    if name not in _VOCABULARY or model.padded_vocab_size == model.vocab_size:
        return None
    return tensor[model.vocab_size :]


def megatron_to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Map full megatron tensors (keyed by global name) to HF LlamaForCausalLM state-dict tensors."""
    check_llama(model)
    return {
        hf_name: tensor.contiguous()
        for name in megatron_names(model)
        for hf_name, tensor in megatron_to_hf_tensors(name, full[name], model)
    }


def megatron_names(model: ModelConfig) -> list[str]:
    """Global names of a Llama GPTModel's parameters (megatron's local layer spec), as `megatron_to_hf` reads
    them: the embedding, the layers in order, the final norm and (untied) the output layer."""
    per_layer = [*_LAYER_COPIES, "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"]
    layers = [f"decoder.layers.{layer}.{name}" for layer in range(model.num_layers) for name in per_layer]
    output = [] if model.share_embeddings_and_output_weights else ["output_layer.weight"]
    return [TIED_EMBEDDING, *layers, "decoder.final_layernorm.weight", *output]


def megatron_shapes(model: ModelConfig, num_attributes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Full shapes of the parameters `megatron_names` lists (plus an APM's head with `num_attributes`), in that
    order: what an export plans its files from before any weight is read."""
    h, ffn, vocab = model.hidden_size, model.ffn_hidden_size, model.padded_vocab_size
    attention = model.num_attention_heads * model.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_proj.weight": (h, attention),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc2.weight": (h, ffn),
        "self_attention.linear_qkv.weight": (attention + 2 * model.query_groups * model.head_dim, h),
        "mlp.linear_fc1.weight": (2 * ffn, h),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name in megatron_names(model):
        match = _LAYER.match(name)
        shapes[name] = per_layer[match.group(2)] if match else (h,) if name.endswith("layernorm.weight") else (vocab, h)
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
        check_llama(model)
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
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    if name == HEAD_WEIGHT:
        return hf[SCORE_WEIGHT]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"an HF Llama has no tensor for megatron parameter {name!r}")
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest in _LAYER_COPIES:
        return hf[prefix + _LAYER_COPIES[rest]]
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = (hf[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv")
        return _pack_qkv(q, k, v, model)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"]])
    raise KeyError(f"an HF Llama has no tensor for megatron parameter {name!r}")


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    return pack_qkv(q, k, v, model.num_attention_heads, model.query_groups, model.head_dim)


def _pad_vocab(rows: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    if rows.shape[0] != model.vocab_size:
        raise ValueError(f"HF vocabulary tensor has {rows.shape[0]} rows, model.vocab_size is {model.vocab_size}")
    return torch.cat([rows, rows.new_zeros(model.padded_vocab_size - model.vocab_size, rows.shape[1])])


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The tensors of a directory's `*.safetensors` files (one or sharded), read from disk on access; `more`
    directories add theirs (an export's set-aside tensors under `steerlm/`)."""

    def __init__(self, directory: Path, *more: Path) -> None:
        self._directory = Path(directory)
        self._files: dict[str, Path] = {}
        for folder in (directory, *more):
            for file in sorted(Path(folder).glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self._files.update(dict.fromkeys(handle.keys(), file))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"no tensor {name!r} in the *.safetensors files of {self._directory}")
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_hf_config(directory: Path) -> dict:
    return json.loads((Path(directory) / HF_CONFIG_FILE).read_text())


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or parameters
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling


def hf_model_fields(hf: dict, key: str, location: str) -> dict:
    """The `model.*` fields an HF Llama config.json determines (`num_query_groups`/`kv_channels` explicit).

    `key`/`location`: the config key that named the directory and its value, for the ConfigError of a model
    `model.*` cannot describe at all (not a Llama, other RoPE scaling).
    """
    rope_theta, scaling = _rope(hf)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    not_llama = [
        f"{name}={hf.get(name)!r}"
        for name, expected in (
            ("model_type", "llama"),
            ("hidden_act", "silu"),
            ("attention_bias", False),
            ("mlp_bias", False),
        )
        if hf.get(name, expected) != expected
    ]
    if rope_type not in ("default", "llama3") or (
        rope_type == "llama3" and any(scaling.get(name) != value for name, value in LLAMA3_SCALING.items())
    ):
        not_llama.append(f"rope scaling {scaling}")
    if not_llama:
        raise ConfigError(
            key,
            location,
            f"holds a model steerlm's Llama cannot express ({', '.join(not_llama)})",
            "convert a Llama-architecture model (RMSNorm, SwiGLU, RoPE, no biases, llama3 or no RoPE scaling)",
        )
    heads = hf["num_attention_heads"]
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "layernorm_epsilon": hf["rms_norm_eps"],
        "rotary_base": int(rope_theta) if rope_theta.is_integer() else rope_theta,
        "share_embeddings_and_output_weights": hf.get("tie_word_embeddings", False),
        "rope_scaling": rope_type == "llama3",
    }
    if rope_type == "llama3":
        fields["rope_scaling_factor"] = float(scaling["factor"])
    return fields


def check_hf_config(hf: dict, model: ModelConfig, key: str, location: str) -> None:
    """Refuse an HF config.json whose model differs from `model.*`, naming the field and the value to set."""
    fields = hf_model_fields(hf, key, location)
    current = {
        **{name: getattr(model, name) for name in fields},
        "num_query_groups": model.query_groups,
        "kv_channels": model.head_dim,
    }
    for name, value in fields.items():
        if current[name] != value:
            raise ConfigError(
                f"model.{name}",
                current[name],
                f"{key}={location} holds an HF Llama with {name}={value!r} (config.json)",
                f"set model.{name}={value!r}",
            )
