"""Build megatron-core GPTModels (Llama family) from a ModelConfig and a ParallelLayout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from steerlm.config.schema import (
    Activation,
    CrossEntropy,
    DType,
    ModelConfig,
    PrecisionConfig,
    Recompute,
    TransformerImpl,
)
from steerlm.config.validation import Accelerator, resolve_transformer_impl
from steerlm.megatron_compat import GPTModelWithLossHead, SDPACoreAttention
from steerlm.megatron_compat.gemma2 import (
    SoftcappedCoreAttention,
    add_post_norms,
    final_logit_softcap,
    set_softcaps,
    softcap_logits,
)
from steerlm.megatron_compat.scaled_embedding import scale_embeddings
from steerlm.megatron_compat.scaled_rope import use_local_rope, use_scaled_rope
from steerlm.models.cross_entropy import chunked_language_model_loss
from steerlm.models.init import initialize_parameters
from steerlm.models.norm import Norm
from steerlm.models.rope import local_rope_frequencies, rope_frequencies
from steerlm.runtime.layout import ParallelLayout

_TORCH_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: Gemma's `gelu_pytorch_tanh` (a named function, unlike megatron's F.gelu, so megatron
    never mistakes it for the exact GELU its bias-GeGLU fusion replaces)."""
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    Activation.swiglu: (F.silu, True),
    Activation.geglu: (gelu_tanh, True),
    Activation.gelu: (F.gelu, False),
    Activation.squared_relu: (lambda x: torch.pow(F.relu(x), 2), False),
}


def torch_dtype(dtype: DType) -> torch.dtype:
    return _TORCH_DTYPES[dtype]


def transformer_config(model: ModelConfig, precision: PrecisionConfig, layout: ParallelLayout) -> TransformerConfig:
    """megatron TransformerConfig for this model on this layout.

    Fusions that need apex/TE kernels are off with the local layers; parameter values come from
    `steerlm.models.init` (layout-independent).
    """
    activation, gated = _ACTIVATIONS[model.activation]
    dtype = torch_dtype(precision.dtype)
    te = _transformer_impl(model, layout) == TransformerImpl.transformer_engine
    scalar = model.query_pre_attn_scalar
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        softmax_scale=None if scalar is None else scalar**-0.5,  # Gemma 2's (transformers' `scaling`)
        # megatron's window counts the positions before a query; a query sees `sliding_window` with itself
        window_size=None if model.sliding_window is None else (model.sliding_window - 1, 0),
        window_attn_skip_freq=model.window_attn_skip_freq,
        normalization=model.normalization.value,
        layernorm_zero_centered_gamma=model.layernorm_zero_centered_gamma,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == DType.bf16,
        fp16=precision.dtype == DType.fp16,
        # Megatron's initialisation also tags tensor-parallel parameters (partition dim/stride) that
        # grad-norm and sharding rely on; its values are then replaced by steerlm.models.init.
        perform_initialization=True,
        use_cpu_initialization=False,
        calculate_per_token_loss=True,
        # `model.recompute`: megatron's full-layer recomputation (only a chunk's input is kept; training only)
        recompute_granularity=None if model.recompute == Recompute.none else "full",
        recompute_method=None if model.recompute == Recompute.none else model.recompute.value,
        recompute_num_layers=None if model.recompute == Recompute.none else model.recompute_num_layers,
        # megatron's fusion replaces F.silu and F.gelu (SwiGLU, NeMo's GeGLU) with its kernels; gelu_tanh is neither
        bias_activation_fusion=te and model.activation == Activation.swiglu,
        bias_dropout_fusion=te,
        masked_softmax_fusion=False,
        persist_layer_norm=te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=True,
        # Pipeline stages exchange activation shapes first, so micro-batches may differ in length.
        variable_seq_lengths=layout.pp > 1,
        moe_token_dispatcher_type="alltoall",  # no experts; megatron refuses variable lengths with "allgather"
        # gloo pairs the batched sends/receives between two ranks out of order: with pp=2 and
        # interleaving (both neighbours are the same rank) activations and gradients get swapped.
        batch_p2p_comm=layout.backend == "nccl",
    )
    set_softcaps(config, model.attn_logit_softcapping, model.final_logit_softcapping)
    return config


def _transformer_impl(model: ModelConfig, layout: ParallelLayout) -> TransformerImpl:
    return resolve_transformer_impl(model, Accelerator.cpu if layout.uses_cpu else Accelerator.cuda)


def decoder_spec(
    model: ModelConfig, config: TransformerConfig, layout: ParallelLayout, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """Transformer Engine layers when selected, else megatron's local layers with SDPA attention and
    `steerlm.models.norm.Norm` (which, unlike megatron's torch fallback, allows sequence parallelism)."""
    if _transformer_impl(model, layout) == TransformerImpl.transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    layer = get_gpt_layer_local_spec(normalization=model.normalization.value, qk_layernorm=model.qk_layernorm)
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SoftcappedCoreAttention if model.attn_logit_softcapping else SDPACoreAttention
    if model.qk_layernorm:  # megatron sums these weights' gradients over TP: each rank normalises its own heads
        attention.q_layernorm = attention.k_layernorm = Norm
    layer.submodules.input_layernorm = Norm
    layer.submodules.pre_mlp_layernorm = Norm
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=layout.pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=Norm)


class ChunkedLossGPTModel(GPTModelWithLossHead):
    """GPTModel whose language-model loss is `steerlm.models.cross_entropy` (`model.cross_entropy=chunked`)."""

    def loss_head(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        return chunked_language_model_loss(
            hidden_states,
            weight,
            labels,
            self.pg_collection.tp,
            self.config.sequence_parallel,
            final_logit_softcap(self.config),
        )


def build_model_chunks(
    model: ModelConfig,
    precision: PrecisionConfig,
    layout: ParallelLayout,
    seed: int,
    model_class: type[GPTModel] | None = None,
    **model_kwargs,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on the layout's device.

    Weights are initialised from `seed` identically for every TP/PP/DP layout (see
    `steerlm.models.init`), in `precision.dtype`; the training stack wraps them for mixed precision.
    `model_class` (a GPTModel subclass, e.g. with an attribute head) receives `model_kwargs`; by default the
    language model whose loss `model.cross_entropy` picks.
    """
    if model_class is None:
        model_class = ChunkedLossGPTModel if model.cross_entropy == CrossEntropy.chunked else GPTModel
    # megatron's constructors draw from the default RNG as much as this rank's shard sizes ask (the weights are then
    # set from `seed`); the default RNG is left as it was, so what training draws from it later (dropout masks, the
    # same on every TP rank) does not depend on the layout
    devices = [layout.device] if layout.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _build_chunks(model, precision, layout, seed, model_class, model_kwargs)


def _build_chunks(
    model: ModelConfig,
    precision: PrecisionConfig,
    layout: ParallelLayout,
    seed: int,
    model_class: type[GPTModel],
    model_kwargs: dict,
) -> list[GPTModel]:
    config = transformer_config(model, precision, layout)
    chunks = []
    stages = layout.vpp or 1
    for vp_stage in range(stages):
        vp = vp_stage if layout.vpp else None
        first = layout.is_first_stage and vp_stage == 0
        last = layout.is_last_stage and vp_stage == stages - 1
        gpt = model_class(
            config=config,
            transformer_layer_spec=decoder_spec(model, config, layout, vp),
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type.value,
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            pg_collection=layout.pg_collection,
            vp_stage=vp,
            **model_kwargs,
        )
        frequencies = rope_frequencies(model)  # LongRoPE's, YaRN's or linear: computed as transformers does
        if frequencies is not None:
            use_scaled_rope(
                gpt, model.rotary_percent, *frequencies, model.rope_original_max_positions, model.rope_attention_factor
            )
        local = local_rope_frequencies(model)  # Gemma 3's sliding-window layers' own
        if local is not None:
            use_local_rope(gpt, model.rotary_percent, local)
        if model.apply_embedding_scaling:
            scale_embeddings(gpt, model.hidden_size**0.5)
        if model.post_sublayer_norms:
            add_post_norms(gpt, lambda: Norm(config, model.hidden_size, eps=model.layernorm_epsilon))
        softcap_logits(gpt)
        gpt.to(layout.device)
        initialize_parameters(gpt, model, seed, layout)
        chunks.append(gpt)
    return chunks
