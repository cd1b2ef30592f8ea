"""Hugging Face Llama <-> megatron GPTModel: configuration and full (unsharded) weight mapping.

Megatron packs attention as one `linear_qkv` whose rows are grouped per query group
([q heads of the group, k, v] x groups) and the SwiGLU MLP as one `linear_fc1` = [gate; up]; HF keeps
separate q/k/v and gate/up projections. Both use non-interleaved ("rotate half") RoPE, so no
permutation of heads is needed. Vocabulary padding rows are dropped on export.
"""

from __future__ import annotations

import torch

from steerlm.config.schema import Activation, ModelConfig, Normalization, PositionEmbedding
from steerlm.models.sharding import TIED_EMBEDDING


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
        config["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    return config


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, head_dim = model.query_groups, model.head_dim
    per_group = model.num_attention_heads // groups
    grouped = qkv.reshape(groups, per_group + 2, head_dim, -1)
    q = grouped[:, :per_group].reshape(model.num_attention_heads * head_dim, -1)
    k = grouped[:, per_group].reshape(groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


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


def megatron_to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Map full megatron tensors (keyed by global name) to HF LlamaForCausalLM state-dict tensors."""
    check_llama(model)
    vocab = model.vocab_size
    out = {
        "model.embed_tokens.weight": full[TIED_EMBEDDING][:vocab],
        "model.norm.weight": full["decoder.final_layernorm.weight"],
    }
    if not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = full["output_layer.weight"][:vocab]
    for layer in range(model.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        q, k, v = _split_qkv(full[src + "self_attention.linear_qkv.weight"], model)
        gate, up = torch.chunk(full[src + "mlp.linear_fc1.weight"], 2, dim=0)
        out.update({
            dst + "input_layernorm.weight": full[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": full[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": full[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": full[src + "mlp.linear_fc2.weight"],
        })
    return {name: tensor.contiguous() for name, tensor in out.items()}
