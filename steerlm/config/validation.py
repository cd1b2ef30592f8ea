"""Checks that need more than one config section, the world size or the device."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

from steerlm.config.lora import LoraConfig
from steerlm.config.schema import (
    Accelerator,
    Backend,
    DType,
    ModelConfig,
    OptimizerName,
    ParallelConfig,
    PrecisionConfig,
    Recompute,
    TrainConfig,
    TrainerConfig,
    TransformerImpl,
)
from steerlm.errors import ConfigError


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(model: ModelConfig, accelerator: Accelerator) -> TransformerImpl:
    """`auto` → Transformer Engine on CUDA when importable, else megatron-core's local layers; the local ones for what
    steerlm builds on them alone (`_local_only`)."""
    local_only = _local_only(model)
    if model.transformer_impl == TransformerImpl.auto:
        if accelerator == Accelerator.cuda and transformer_engine_available() and local_only is None:
            return TransformerImpl.transformer_engine
        return TransformerImpl.local
    if model.transformer_impl == TransformerImpl.transformer_engine and local_only is not None:
        raise ConfigError(
            "model.transformer_impl",
            model.transformer_impl.value,
            f"steerlm builds {local_only} on megatron-core's own layers alone, not Transformer Engine's",
            "use model.transformer_impl=auto or local",
        )
    if model.transformer_impl == TransformerImpl.transformer_engine:
        if accelerator != Accelerator.cuda or not transformer_engine_available():
            raise ConfigError(
                "model.transformer_impl",
                model.transformer_impl.value,
                "Transformer Engine layers need CUDA and the transformer_engine package",
                "use model.transformer_impl=auto or local",
            )
    return model.transformer_impl


def _local_only(model: ModelConfig) -> str | None:
    """What of `model` steerlm builds on megatron-core's own layers alone, None for nothing: Gemma 2's norms of sublayer
    outputs (`steerlm.megatron_compat.gemma2`) and soft-capped scores (TE's fused attention cannot cap them), and
    sliding windows (TE would take megatron's `window_size`, which no test here runs). The logits' cap is a hook on
    the output layer, which both build alike."""
    for name, what in (
        ("post_sublayer_norms", "norms of each sublayer's output (model.post_sublayer_norms)"),
        ("attn_logit_softcapping", "soft-capped attention scores (model.attn_logit_softcapping)"),
        ("sliding_window", "sliding-window attention (model.sliding_window)"),
    ):
        if getattr(model, name):
            return what
    return None


def training_model(model: ModelConfig, lora: LoraConfig) -> ModelConfig:
    """The model a run trains: with LoRA adapters, `transformer_impl=auto` picks megatron-core's local layers, the
    ones LoRA is implemented on (Transformer Engine fuses the input norm into `linear_qkv` / `linear_fc1`, whose
    adapters would then see the un-normalised input). The checkpoints are the same either way: weights are named as
    the local layers name them, and inference builds whichever layers `auto` picks."""
    if lora.enabled and model.transformer_impl == TransformerImpl.auto:
        return replace(model, transformer_impl=TransformerImpl.local)
    return model


def resolve_torch_compile(trainer: TrainerConfig, parallel: ParallelConfig, accelerator: Accelerator) -> bool:
    """`trainer.torch_compile`, with null resolved: compiled layers on CUDA at TP=1 (docs/performance.md
    measures it), eager on CPU (compilation takes minutes there and did not make steps faster) and under TP."""
    if trainer.torch_compile is not None:
        return trainer.torch_compile
    return accelerator == Accelerator.cuda and parallel.tensor_model_parallel_size == 1


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """World size divided by the model-parallel size, or a ConfigError saying which layouts fit."""
    mp = parallel.model_parallel_size
    if world_size % mp != 0:
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            parallel.tensor_model_parallel_size,
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel size "
            f"{parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size} x "
            f"{parallel.context_parallel_size} = {mp}",
            "launch a multiple of that many processes or change the parallel sizes",
        )
    dp = world_size // mp
    if parallel.data_parallel_size is not None and parallel.data_parallel_size != dp:
        raise ConfigError(
            "parallel.data_parallel_size",
            parallel.data_parallel_size,
            f"world size {world_size} / model-parallel size {mp} gives {dp}",
            f"set parallel.data_parallel_size=null (or {dp}), or launch {parallel.data_parallel_size * mp} processes",
        )
    return dp


def validate_generation_layout(parallel: ParallelConfig, what: str = "generation") -> None:
    """What KV-cache generation cannot split: the sequence (a decoding step feeds one position, so neither
    context nor sequence parallelism) and a stage into interleaved chunks. Tensor and pipeline parallelism it
    runs. ConfigError naming the key; `what` names the recipe's use of generation in the message."""
    cp = parallel.context_parallel_size
    if cp != 1:
        raise ConfigError(
            "parallel.context_parallel_size",
            cp,
            f"{what} splits no sequence: a decoding step feeds one position",
            "set parallel.context_parallel_size=1 and split the model with tensor or pipeline parallelism; a "
            "checkpoint saved at any layout loads at any other",
        )
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp > 1:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size",
            vpp,
            f"{what} runs one model chunk per pipeline stage",
            "unset parallel.virtual_pipeline_model_parallel_size (null)",
        )
    if parallel.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel", True, f"is not supported by {what}", "set parallel.sequence_parallel=false"
        )


def _check_recompute(model: ModelConfig, per_chunk: int) -> None:
    """Recomputed chunks of layers must tile each model chunk (uniform) or fit in it (block)."""
    n = model.recompute_num_layers
    if model.recompute == Recompute.uniform and per_chunk % n:
        raise ConfigError(
            "model.recompute_num_layers",
            n,
            f"does not divide the {per_chunk} layers of each pipeline chunk (model.recompute=uniform)",
            f"use a divisor of {per_chunk} (1 rebuilds one layer at a time in the backward)",
        )
    if model.recompute == Recompute.block and n > per_chunk:
        raise ConfigError(
            "model.recompute_num_layers",
            n,
            f"is more than the {per_chunk} layers of each pipeline chunk (model.recompute=block)",
            f"use at most {per_chunk}",
        )


def validate_model_layout(
    model: ModelConfig, parallel: ParallelConfig, accelerator: Accelerator, this_machine: bool = True
) -> None:
    """Can this model shape be split this way on this device? With `this_machine=False` (planning a job
    that runs elsewhere) the checks that depend on this machine's installed packages are skipped."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if model.num_attention_heads % tp:
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"must divide model.num_attention_heads={model.num_attention_heads}",
            "pick a tensor-parallel size that divides the head count",
        )
    if model.query_groups % tp:
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"must divide the number of query groups ({model.query_groups})",
            "pick a tensor-parallel size that divides model.num_query_groups",
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"must divide model.ffn_hidden_size={model.ffn_hidden_size}",
            "pick a tensor-parallel size that divides the MLP width",
        )
    if model.padded_vocab_size % tp:
        raise ConfigError(
            "model.make_vocab_size_divisible_by",
            model.make_vocab_size_divisible_by,
            f"padded vocabulary {model.padded_vocab_size} is not divisible by tensor_model_parallel_size={tp}",
            f"use a multiple of {tp} (128 suits every power-of-two TP size)",
        )
    chunks = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % chunks:
        raise ConfigError(
            "model.num_layers",
            model.num_layers,
            f"not divisible by pipeline stages x virtual stages = {chunks}",
            "change pipeline_model_parallel_size / virtual_pipeline_model_parallel_size or the layer count",
        )
    if pp > 1 and model.num_layers // chunks < 1:
        raise ConfigError(
            "parallel.pipeline_model_parallel_size", pp, "more pipeline chunks than layers", "use fewer pipeline stages"
        )
    _check_recompute(model, model.num_layers // chunks)
    if not this_machine:
        return
    impl = resolve_transformer_impl(model, accelerator)
    if parallel.context_parallel_size > 1 and impl != TransformerImpl.transformer_engine:
        raise ConfigError(
            "parallel.context_parallel_size",
            parallel.context_parallel_size,
            "context parallelism needs Transformer Engine attention (CUDA + transformer_engine)",
            "use parallel.context_parallel_size=1",
        )
    if model.attention_dropout > 0 and impl == TransformerImpl.local and parallel.sequence_parallel:
        raise ConfigError(
            "model.attention_dropout",
            model.attention_dropout,
            "attention dropout under sequence parallelism is not supported by the local layers",
            "use model.attention_dropout=0.0",
        )


def validate_precision(precision: PrecisionConfig, accelerator: Accelerator, this_machine: bool = True) -> None:
    if precision.dtype == DType.fp16 and accelerator == Accelerator.cpu:
        raise ConfigError(
            "precision.dtype",
            precision.dtype.value,
            "fp16 training needs a GPU (megatron's fp16 loss scaling is CUDA-only)",
            "use precision.dtype=bf16 or fp32 on CPU",
        )
    if precision.dtype == DType.bf16 and accelerator == Accelerator.cuda and this_machine:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "precision.dtype",
                precision.dtype.value,
                "this GPU has no bf16 support",
                "use precision.dtype=fp16 (with loss scaling) or fp32",
            )


def validate_parallel_runtime(parallel: ParallelConfig, accelerator: Accelerator) -> None:
    if parallel.distributed_backend == Backend.nccl and accelerator == Accelerator.cpu:
        raise ConfigError(
            "parallel.distributed_backend",
            "nccl",
            "nccl needs CUDA devices",
            "use parallel.distributed_backend=auto (gloo without a GPU)",
        )


def validate_batch(trainer: TrainerConfig, model: ModelConfig, parallel: ParallelConfig, dp: int) -> None:
    per_step = trainer.micro_batch_size * dp
    if trainer.global_batch_size % per_step:
        raise ConfigError(
            "trainer.global_batch_size",
            trainer.global_batch_size,
            f"not divisible by micro_batch_size x data_parallel_size = {trainer.micro_batch_size} x {dp}",
            f"use a multiple of {per_step}",
        )
    if trainer.seq_length > model.max_position_embeddings:
        raise ConfigError(
            "trainer.seq_length",
            trainer.seq_length,
            f"longer than model.max_position_embeddings={model.max_position_embeddings}",
            "shorten the sequences or raise max_position_embeddings",
        )
    if parallel.sequence_parallel and trainer.seq_length % parallel.tensor_model_parallel_size:
        raise ConfigError(
            "trainer.seq_length",
            trainer.seq_length,
            f"sequence parallelism splits it across {parallel.tensor_model_parallel_size} ranks",
            "use a multiple of the tensor-parallel size",
        )
    cp = parallel.context_parallel_size
    if cp > 1 and trainer.seq_length % (2 * cp):
        raise ConfigError(
            "trainer.seq_length",
            trainer.seq_length,
            f"context parallelism needs a multiple of 2 x context_parallel_size = {2 * cp}",
            f"use a multiple of {2 * cp}",
        )


def validate_train_config(
    cfg: TrainConfig, world_size: int, accelerator: Accelerator, this_machine: bool = True
) -> int:
    """Validate a whole training config for a launch of `world_size` processes; returns the DP size.

    `this_machine=False` validates a job planned here to run elsewhere (a Slurm login node has no
    GPU): checks of this machine's GPU and installed packages (bf16 support, Transformer Engine) are left
    to the job itself, which validates again at start.
    """
    cfg.model.validate()
    cfg.parallel.validate()
    cfg.precision.validate()
    cfg.trainer.validate()
    cfg.optim.validate()
    cfg.checkpoint.validate()
    dp = data_parallel_size(cfg.parallel, world_size)
    validate_model_layout(training_model(cfg.model, cfg.lora), cfg.parallel, accelerator, this_machine)
    validate_precision(cfg.precision, accelerator, this_machine)
    validate_parallel_runtime(cfg.parallel, accelerator)
    if cfg.parallel.use_distributed_optimizer and cfg.optim.name != OptimizerName.adam:
        raise ConfigError(
            "optim.name",
            cfg.optim.name.value,
            "megatron's distributed optimizer shards Adam's state only",
            "use optim.name=adam or parallel.use_distributed_optimizer=false",
        )
    validate_batch(cfg.trainer, cfg.model, cfg.parallel, dp)
    cfg.lora.validate()
    if cfg.lora.enabled and cfg.model.transformer_impl == TransformerImpl.transformer_engine:
        raise ConfigError(
            "model.transformer_impl",
            cfg.model.transformer_impl.value,
            "selects Transformer Engine's layers, whose fused input norms the adapters would have to repeat; "
            "LoRA is implemented and tested on megatron-core's local layers",
            "set model.transformer_impl=auto or local for a LoRA run (lora.rank > 0): both build the local layers",
        )
    return dp


def validate_vocab(model: ModelConfig, tokenizer_vocab_size: int, tokenizer_path: str) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce.

    HF tokenizers grow by the `<extra_id_0..2>` tokens the SteerLM template needs when they lack
    them, so a preset's vocabulary (e.g. 32000) may need raising to the tokenizer's (32003); steerlm
    never resizes silently.
    """
    if model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            "model.vocab_size",
            model.vocab_size,
            f"the tokenizer at {tokenizer_path} has {tokenizer_vocab_size} token ids "
            "(including any <extra_id_*> tokens it had to add)",
            f"set model.vocab_size={tokenizer_vocab_size} (padding rounds it up to model.make_vocab_size_divisible_by)",
        )
