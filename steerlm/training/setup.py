"""Build what a stage trains: model chunks, megatron DDP, mixed precision, optimizer and LR schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from steerlm import megatron_compat
from steerlm.checkpoint.sources import BaseWeights
from steerlm.config.schema import DType, ModelConfig, OptimizerConfig, PrecisionConfig, TrainConfig, TrainerConfig
from steerlm.config.validation import Accelerator, resolve_torch_compile, resolve_transformer_impl, training_model
from steerlm.models import lora
from steerlm.models.gpt import build_model_chunks, torch_dtype
from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)


def wrap_for_training(
    chunks: list, precision: PrecisionConfig, use_distributed_optimizer: bool, layout: ParallelLayout
) -> list[DistributedDataParallel]:
    """Mixed-precision wrapper (bf16/fp16) and megatron DDP around each chunk.

    Gradients accumulate in fp32 `main_grad` buffers (when `grad_reduce_in_fp32`), are summed across
    data-parallel ranks, and are divided by the global token count in `finalize_model_grads`.
    """
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if precision.dtype != DType.fp32 else chunk
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=module,
                disable_bucketing=index > 0,
                pg_collection=layout.pg_collection,
            )
        )
    config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=layout.pg_collection)
    config.no_sync_func = [chunk.no_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(
    model: list[DistributedDataParallel],
    optim: OptimizerConfig,
    precision: PrecisionConfig,
    trainer: TrainerConfig,
    use_distributed_optimizer: bool,
    layout: ParallelLayout,
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Megatron optimizer (fp32 master weights under bf16/fp16; no weight decay on norms and biases)
    and its warmup + decay LR schedule, stepped once per optimizer step."""
    config = MegatronOptimizerConfig(
        optimizer=optim.name.value,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=precision.dtype == DType.bf16,
        fp16=precision.dtype == DType.fp16,
        params_dtype=torch_dtype(precision.dtype),
        initial_loss_scale=precision.initial_loss_scale,
        min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model, use_gloo_process_groups=False, pg_collection=layout.pg_collection)
    megatron_compat.set_fused(optimizer, optim.fused)
    megatron_compat.use_single_pass_scale()
    decay_steps = optim.lr_decay_steps or trainer.max_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style.value,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # On resume the configured schedule applies (configs are the interface); the checkpoint
        # supplies only the number of steps taken.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    for chunk in model:
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


ModelProvider = Callable[[ModelConfig, PrecisionConfig, ParallelLayout, int], list]


@dataclass
class TrainingSetup:
    """Everything a stage trains: the bare model chunks, their DDP wrappers, optimizer and schedule, and the base
    whose weights its checkpoints leave out (a LoRA run's `lora.checkpoint`; set by `resume_or_initialise`)."""

    chunks: list
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    base: BaseWeights | None = None


def compile_layers(chunks: list) -> None:
    """`torch.compile` each transformer layer in place (regional compilation: layers of one shape share their
    compiled code, and parameter names, state dicts and megatron's gradient hooks stay as they are)."""
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            layer.compile()


def build_training(
    cfg: TrainConfig, layout: ParallelLayout, model_provider: ModelProvider = build_model_chunks
) -> TrainingSetup:
    """Build (via `model_provider`, e.g. a GPT with a regression head), add LoRA adapters when `lora.rank` > 0
    (the base weights then stay frozen), compile when configured, wrap and attach the optimizer."""
    accelerator = Accelerator.cpu if layout.uses_cpu else Accelerator.cuda
    model_cfg = training_model(cfg.model, cfg.lora)
    if resolve_transformer_impl(model_cfg, accelerator) != resolve_transformer_impl(cfg.model, accelerator):
        log.info(
            "model.transformer_impl=auto: megatron-core's local layers for this LoRA run (not Transformer Engine's)"
        )
    chunks = model_provider(model_cfg, cfg.precision, layout, cfg.trainer.seed)
    if cfg.lora.enabled:
        lora.attach(chunks, cfg.lora, cfg.trainer.seed)
        lora.freeze_base(chunks)
    if resolve_torch_compile(cfg.trainer, cfg.parallel, accelerator):
        compile_layers(chunks)
    distributed_optimizer = cfg.parallel.use_distributed_optimizer
    model = wrap_for_training(chunks, cfg.precision, distributed_optimizer, layout)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.precision, cfg.trainer, distributed_optimizer, layout)
    return TrainingSetup(chunks=chunks, model=model, optimizer=optimizer, scheduler=scheduler)
