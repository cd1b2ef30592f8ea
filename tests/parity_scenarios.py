"""Training scenarios run inside spawned ranks; they return numbers the parity tests compare.

Every scenario builds the tiny model from one seed (initialisation is layout-independent), feeds
the same global batches and returns losses, grad norms, full (TP-gathered) gradients of the first
step and full parameters after the last step, keyed by global parameter name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch

from steerlm import runtime
from steerlm.config import (
    Activation,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizerName,
    ParallelConfig,
    PrecisionConfig,
    TrainerConfig,
    TransformerImpl,
)
from steerlm.data.attributes import MISSING
from steerlm.models import build_model_chunks, lora
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.sharding import full_shape, gather_full, load_full_parameters, named_global_parameters
from steerlm.training import (
    ATTRIBUTE_REGRESSION,
    LANGUAGE_MODEL,
    Task,
    build_optimizer,
    forward_backward,
    microbatches_for_rank,
    train_step,
    wrap_for_training,
)

SEED = 1234
TINY = ModelConfig(
    name="parity",
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=300,
    max_position_embeddings=64,
    transformer_impl=TransformerImpl.local,
)
TRAINER = TrainerConfig(micro_batch_size=2, global_batch_size=8, seq_length=32, max_steps=3, seed=SEED)
ADAM = OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_warmup_steps=2, clip_grad=0.5, weight_decay=0.1)
# Adam's first update is ~lr * sign(grad), which turns 1e-9 summation-order noise in near-zero
# gradients into full-size differences; SGD's update is linear in the gradient, so it checks the
# DDP / optimizer update itself tightly.
SGD = OptimizerConfig(name=OptimizerName.sgd, lr=0.5, min_lr=0.05, lr_warmup_steps=2, clip_grad=0.5, weight_decay=0.1)


@dataclass(frozen=True)
class Scenario:
    name: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tied: bool = False
    initial_state: dict[str, torch.Tensor] | None = None  # load these weights instead of the seed's
    variable_lengths: bool = False  # micro-batch j is cut to seq_length - 4j positions (dynamic padding)
    apm: bool = False  # the regression attribute model (3 attributes, some labels missing) instead of the LM
    optim: OptimizerConfig = field(default_factory=lambda: ADAM)
    transformer_impl: TransformerImpl = TransformerImpl.local  # transformer_engine: TE layers (CUDA + TE)
    lora: LoraConfig | None = None  # adapters on every linear (B given values, so A has gradients), the rest frozen
    qwen: bool = False  # Qwen2's q/k/v biases and Qwen3's QK norms (whose gradients megatron sums over TP)
    # Gemma 2's layers, Gemma's with more: GeGLU, zero-centred RMSNorm, scaled input embeddings (a hook on the
    # embedding), norms of each sublayer's output (hooks on the attention and the MLP), soft-capped scores and logits
    # (caps at the tiny model's scale, so that both bite), another attention scale, and a window of 8 of the 32
    # positions on every other layer, which rotates with RoPE of its own base (Gemma 3's local RoPE: a hook per layer)
    gemma: bool = False

    @property
    def reference(self) -> str:
        return (
            ("tied" if self.tied else "untied")
            + ("_sgd" if self.optim.name == OptimizerName.sgd else "")
            + ("_varlen" if self.variable_lengths else "")
            + ("_apm" if self.apm else "")
            + ("_lora" if self.lora else "")
            + ("_dropout" if self.lora and self.lora.dropout else "")
            + ("_qwen" if self.qwen else "")
            + ("_gemma2" if self.gemma else "")
        )

    @property
    def task(self) -> Task:
        return ATTRIBUTE_REGRESSION if self.apm else LANGUAGE_MODEL

    def microbatches(self, step: int, layout) -> list[dict[str, torch.Tensor]]:
        batch = apm_global_batch(step) if self.apm else global_batch(step)
        microbatches = microbatches_for_rank(batch, TRAINER.micro_batch_size, layout)
        if not self.variable_lengths:
            return microbatches
        return [{k: v[:, : TRAINER.seq_length - 4 * j] for k, v in mb.items()} for j, mb in enumerate(microbatches)]


def global_batch(step: int, model: ModelConfig = TINY, trainer: TrainerConfig = TRAINER) -> dict[str, torch.Tensor]:
    """Deterministic random tokens; loss masks with different token counts per row."""
    generator = torch.Generator().manual_seed(SEED + step)
    rows, length = trainer.global_batch_size, trainer.seq_length
    stream = torch.randint(0, model.vocab_size, (rows, length + 1), generator=generator)
    loss_mask = (torch.rand(rows, length, generator=generator) > 0.4).to(torch.float32)
    loss_mask[0, : length // 2] = 0.0
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(length).expand(rows, length).contiguous(),
    }


APM_ATTRIBUTES = 3


def apm_global_batch(step: int) -> dict[str, torch.Tensor]:
    """LM batch plus a scored position per row and 0-4 targets, a quarter of them missing."""
    batch = global_batch(step)
    generator = torch.Generator().manual_seed(SEED + 1000 + step)
    rows = TRAINER.global_batch_size
    targets = torch.randint(0, 5, (rows, APM_ATTRIBUTES), generator=generator).float()
    targets[torch.rand(rows, APM_ATTRIBUTES, generator=generator) < 0.25] = MISSING
    return {
        "tokens": batch["tokens"],
        "position_ids": batch["position_ids"],
        "targets": targets,
        "score_index": torch.randint(TRAINER.seq_length // 2, TRAINER.seq_length, (rows,), generator=generator),
    }


def _full_tensors(model, layout, attribute: str) -> dict[str, torch.Tensor]:
    """Every parameter's full `attribute` (a frozen parameter has no `main_grad`)."""
    chunks = [chunk.module for chunk in model]
    tp_group = layout.pg_collection.tp
    out = {}
    for name, param in named_global_parameters(chunks):
        if attribute == "main_grad" and not param.requires_grad:
            continue
        out[name] = gather_full(getattr(param, attribute).detach().float(), param, tp_group).clone()
    return out


def _with_adapters(chunks, cfg: LoraConfig, layout) -> None:
    """Adapters from the seed, B filled from full tensors of a generator seeded by its name (the same at every
    layout and pipeline stage)."""
    lora.attach(chunks, cfg, SEED)
    full = {
        name: torch.randn(
            full_shape(param, layout.tp), generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))
        )
        * 0.05
        for name, param in named_global_parameters(chunks)
        if name.endswith(".lora_b")
    }
    load_full_parameters(chunks, full, layout.tp_rank, layout.tp, keep=lambda name: name not in full)
    lora.freeze_base(chunks)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


@torch.no_grad()
def _full_logits(chunks, layout) -> torch.Tensor:
    """Vocabulary-gathered logits `[b, s, padded_vocab]` of the first global batch's first rows."""
    batch = global_batch(0)
    device = layout.device
    logits = chunks[0](batch["tokens"][:2].to(device), batch["position_ids"][:2].to(device), None)
    parts = [torch.empty_like(logits) for _ in range(layout.tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=layout.pg_collection.tp)
    return torch.cat(parts, dim=-1)


def run(scenario: Scenario) -> dict:
    layout = runtime.initialize(scenario.parallel, seed=SEED)
    model_cfg = replace(
        TINY,
        share_embeddings_and_output_weights=scenario.tied,
        transformer_impl=scenario.transformer_impl,
        add_qkv_bias=scenario.qwen,
        qk_layernorm=scenario.qwen,
        activation=Activation.geglu if scenario.gemma else TINY.activation,
        layernorm_zero_centered_gamma=scenario.gemma,
        apply_embedding_scaling=scenario.gemma,
        post_sublayer_norms=scenario.gemma,
        attn_logit_softcapping=0.05 if scenario.gemma else None,
        final_logit_softcapping=0.1 if scenario.gemma else None,
        query_pre_attn_scalar=24 if scenario.gemma else None,
        sliding_window=8 if scenario.gemma else None,
        window_attn_skip_freq=2 if scenario.gemma else None,
        rope_local_base_freq=100 if scenario.gemma else None,
    )
    if scenario.apm:
        chunks = build_attribute_model_chunks(model_cfg, PrecisionConfig(), layout, SEED, APM_ATTRIBUTES)
    else:
        chunks = build_model_chunks(model_cfg, PrecisionConfig(), layout, seed=SEED)
    if scenario.initial_state is not None:
        load_full_parameters(chunks, scenario.initial_state, layout.tp_rank, layout.tp)
    if scenario.lora is not None:
        _with_adapters(chunks, scenario.lora, layout)
    initial = {
        name: gather_full(p.detach(), p, layout.pg_collection.tp).clone() for name, p in named_global_parameters(chunks)
    }
    logits = _full_logits(chunks, layout) if layout.pp == 1 and not scenario.apm else None
    distributed_optimizer = scenario.parallel.use_distributed_optimizer
    model = wrap_for_training(chunks, PrecisionConfig(), distributed_optimizer, layout)
    optimizer, scheduler = build_optimizer(
        model, scenario.optim, PrecisionConfig(), TRAINER, distributed_optimizer, layout
    )

    first = scenario.microbatches(0, layout)
    for chunk in model:
        chunk.zero_grad_buffer()
    scheduler.step(increment=1)
    loss0, tokens0 = forward_backward(model, first, layout, scenario.task)
    grads = _full_tensors(model, layout, "main_grad")
    _, norm0, _ = optimizer.step()
    after_first_step = _full_tensors(model, layout, "data")
    losses, norms = [loss0], [float(norm0)]
    for step in range(1, TRAINER.max_steps):
        result = train_step(model, optimizer, scheduler, scenario.microbatches(step, layout), layout, scenario.task)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    out = {
        "layout": layout.describe(),
        "rank": layout.rank,
        "tokens": tokens0,
        "losses": losses,
        "grad_norms": norms,
        "initial": initial,
        "logits": logits,
        "grads": grads,
        "after_first_step": after_first_step,
    }
    out = {key: _to_cpu(value) for key, value in out.items()}
    runtime.shutdown(destroy_process_group=False)
    return out


LORA = LoraConfig(rank=4, alpha=8.0)
# Dropout masks come from the default RNG, drawn alike by every TP rank: tensor parallelism keeps the numbers (not
# pipeline or data parallelism, whose ranks draw in another order, nor sequence parallelism, which pads a
# micro-batch to a multiple of the TP size and so draws a mask over more positions: as for megatron's own dropout).
LORA_DROPOUT = replace(LORA, dropout=0.25)

REFERENCES = [
    Scenario("untied"),
    Scenario("tied", tied=True),
    Scenario("untied_sgd", optim=SGD),
    Scenario("untied_varlen", variable_lengths=True),
    Scenario("untied_apm", apm=True),
    Scenario("untied_sgd_lora", optim=SGD, lora=LORA),
    Scenario("untied_lora", lora=LORA),
    Scenario("untied_sgd_lora_dropout", optim=SGD, lora=LORA_DROPOUT),
    Scenario("untied_sgd_qwen", optim=SGD, qwen=True),
    Scenario("tied_sgd_gemma2", tied=True, optim=SGD, gemma=True),
]


def run_all(scenarios: list[Scenario]) -> dict[str, dict]:
    results = {scenario.name: run(scenario) for scenario in scenarios}
    runtime.shutdown()
    return results
