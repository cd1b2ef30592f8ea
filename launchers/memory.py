"""Memory per GPU of a training job, estimated from its config before it is submitted.

    python -m launchers.memory          # the shipped presets at their launch layouts (docs/performance.md)

`estimate_memory` counts what the busiest rank holds (the first pipeline stage, which also keeps the most
micro-batches' activations in flight under 1F1B; with the embedding or output layer when a stage holds one):

- weights in the compute dtype;
- gradients in megatron DDP's buffer (fp32 with `precision.grad_reduce_in_fp32`, the default);
- optimizer state: Adam's two moments and, under bf16/fp16, the fp32 master weights (12 bytes per parameter;
  8 in fp32), divided by the data-parallel size with `parallel.use_distributed_optimizer`;
- with LoRA (`lora.rank` > 0) the adapters are weights too, and only they have gradients and optimizer state
  (their rank-sized activations are left out);
- activations kept for the backward per micro-batch and layer, as autograd keeps them for steerlm's local Llama
  layers (pre-norm, SwiGLU, grouped-query attention through flash/SDPA kernels, which keep no `seq x seq`
  scores; tests/test_memory_estimate.py counts the saved tensors of a real forward): per norm its input,
  output and the next linear's input (split over TP ranks only with sequence parallelism), and the attention's
  and SwiGLU's tensors (split over TP ranks); times the micro-batches in flight (the pipeline size under 1F1B);
  plus the loss's `seq x vocab/tp` tensors on the last stage (`model.cross_entropy`: the chunked loss keeps one
  in the compute dtype, megatron's the fp32 softmax). Transformer Engine's fused norms keep less. With layer
  recomputation (`model.recompute`) a recomputed chunk of layers keeps its input hidden state alone (split over TP
  ranks with sequence parallelism), and the backward holds one chunk's activations again while it recomputes them
  (`recomputed`, once: micro-batches are recomputed one at a time).

Not counted: the CUDA context, NCCL and allocator buffers (plan 3-6 GiB more per GPU), and packed-sequence
attention masks (`[micro-batch, 1, seq, seq]` booleans).

`checkpoint_bytes` sizes one checkpoint on disk, the whole job's: the weights in the compute dtype and the trained
parameters' optimizer state (as above, never divided: the distributed optimizer saves every parameter's state at
its full shape); a LoRA run saving its adapters alone (`lora.checkpoint`) writes only theirs. `weights_bytes` sizes
the run's weights alone, as `recipes/convert.py to=steerlm` writes them (adapters merged, no optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass

from steerlm.config import (
    CrossEntropy,
    DType,
    LoraConfig,
    ModelConfig,
    Normalization,
    OptimizerName,
    Recompute,
    TrainConfig,
)
from steerlm.config.lora import LoraCheckpoint

GIB = 2**30
DTYPE_BYTES = {DType.fp32: 4, DType.bf16: 2, DType.fp16: 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank."""

    parameters: int  # parameters this rank holds
    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int  # micro-batches whose activations the busiest stage holds at once
    recomputed: float = 0.0  # of the activations: one recomputed chunk's, rebuilt in the backward (`model.recompute`)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (
            f"memory per GPU (estimate, busiest rank, {self.parameters / 1e9:.2f}B parameters): "
            f"weights {self.weights / GIB:.1f} GiB + gradients {self.gradients / GIB:.1f} + optimizer "
            f"{self.optimizer / GIB:.1f} + activations {self.activations / GIB:.1f} ({self.in_flight} micro-batch"
            f"{'es' if self.in_flight > 1 else ''} in flight"
            f"{f'; {self.recomputed / GIB:.1f} of them recomputed in the backward' if self.recomputed else ''}) "
            f"= {self.total / GIB:.1f} GiB, plus 3-6 GiB of CUDA "
            "context and communication buffers"
        )


def _linear_shapes(model: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """A layer's four linear layers: (inputs, outputs, column-parallel) at their full shapes."""
    h, ffn, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, 2 * model.query_groups * d
    gated = 2 if model.gated_mlp else 1
    return {
        "linear_qkv": (h, q + kv, True),
        "linear_proj": (q, h, False),
        "linear_fc1": (h, ffn * gated, True),
        "linear_fc2": (ffn, h, False),
    }


def _norm_parameters(model: ModelConfig) -> int:
    """One norm's: a weight, and LayerNorm's bias."""
    return model.hidden_size * (2 if model.normalization == Normalization.LayerNorm else 1)


def _layer_biases(model: ModelConfig, tp: int) -> int:
    """A TP rank's linear biases of one layer: every layer's (`add_bias_linear`) or q/k/v's alone (`add_qkv_bias`); a
    column-parallel layer's bias is split like its outputs, a row-parallel one's replicated."""
    shapes = _linear_shapes(model)
    names = list(shapes) if model.add_bias_linear else ["linear_qkv"] if model.add_qkv_bias else []
    return sum(shapes[name][1] // tp if shapes[name][2] else shapes[name][1] for name in names)


def _layer_parameters(model: ModelConfig, tp: int) -> int:
    matrices = sum(inputs * outputs for inputs, outputs, _ in _linear_shapes(model).values()) // tp
    # Qwen3's QK norms: a weight (and LayerNorm's bias) per head channel, shared by the heads, on every TP rank
    qk_norms = 2 * model.head_dim * (2 if model.normalization == Normalization.LayerNorm else 1)
    norms = (4 if model.post_sublayer_norms else 2) * _norm_parameters(model)  # Gemma 2's norms of sublayer outputs
    return matrices + _layer_biases(model, tp) + norms + (qk_norms if model.qk_layernorm else 0)


def _layer_adapters(model: ModelConfig, tp: int, lora: LoraConfig) -> int:
    """LoRA parameters of one layer on a TP rank: a column-parallel layer's B and a row-parallel layer's A are split,
    the other matrix of each replicated (steerlm.models.lora)."""
    if not lora.enabled:
        return 0
    shapes = _linear_shapes(model)
    total = 0
    for target in lora.targets:
        inputs, outputs, column = shapes[target]
        total += lora.rank * (inputs + outputs // tp if column else inputs // tp + outputs)
    return total


def stage_parameters(model: ModelConfig, tp: int, pp: int, first: bool, last: bool) -> int:
    """Parameters a TP rank of a pipeline stage holds (the last stage keeps its own copy of a tied output layer)."""
    vocab = model.padded_vocab_size * model.hidden_size // tp
    output = vocab if last and (pp > 1 or not model.share_embeddings_and_output_weights) else 0
    return (
        model.num_layers // pp * _layer_parameters(model, tp)
        + (vocab if first else 0)
        + output
        + (_norm_parameters(model) if last else 0)
    )


def _layer_activations(
    model: ModelConfig, tokens: int, keys: int, tp: int, sequence_parallel: bool, size: int
) -> float:
    """`keys`: the positions each query attends over (the sequence's), which soft-capped scores are kept for."""
    h, ffn = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim  # heads may be wider
    # per norm: its input (the residual stream), the normalised tensor and the following linear's input (torch's
    # RMSNorm keeps a tensor more than its LayerNorm, whose output is the linear's input)
    replicated = (6 if model.normalization == Normalization.RMSNorm else 4) * tokens * h
    # Gemma 2's norms of the attention's and the MLP's output: each its input and the normalised tensor
    replicated += 4 * tokens * h if model.post_sublayer_norms else 0
    # linear_qkv's whole output (value is a view of it), the rotated query and key, the attention output; and
    # SwiGLU's linear_fc1 output ([gate; up]), the activation's input and output and the product — an ungated
    # activation (squared ReLU, GELU) keeps its input and output alone
    mlp = 5 * ffn if model.gated_mlp else 2 * ffn
    # Qwen3's QK norms (measured on a forward): the query twice (megatron's copy of it out of linear_qkv's output, the
    # normalised one), the normalised key, and one scalar per head and position for each norm
    heads = model.num_attention_heads + model.query_groups
    qk_norms = 2 * model.num_attention_heads * model.head_dim + kv + heads if model.qk_layernorm else 0
    split = tokens * (3 * q + 3 * kv + mlp + qk_norms)
    # soft-capped attention scores have no fused kernel: the capped scores and the fp32 softmax are kept per head, 8
    # bytes per score in fp32 and in bf16 (2 for the capped scores, 4 for the softmax, 2 for its bf16 copy)
    scores = 8 * tokens * model.num_attention_heads * keys if model.attn_logit_softcapping else 0
    return size * (replicated / (tp if sequence_parallel else 1) + split / tp) + scores / tp


def _stage_activations(
    model: ModelConfig, tokens: int, keys: int, tp: int, pp: int, sequence_parallel: bool, size: int
) -> tuple[float, float]:
    """(kept per micro-batch, rebuilt once in the backward) by a pipeline stage's layers under `model.recompute`."""
    layers, layer = model.num_layers // pp, _layer_activations(model, tokens, keys, tp, sequence_parallel, size)
    hidden = size * tokens * model.hidden_size / (tp if sequence_parallel else 1)  # a recomputed chunk's input
    n = model.recompute_num_layers
    if model.recompute == Recompute.uniform:
        return layers // n * hidden, n * layer
    if model.recompute == Recompute.block:
        return n * hidden + (layers - n) * layer, layer
    return layers * layer, 0.0


def loss_activations(model: ModelConfig, tokens: int, tp: int, size: int) -> float:
    """The final norm's tensors and the loss's `tokens x vocab/tp` ones on the last stage."""
    shard = tokens * model.padded_vocab_size / tp
    vocabulary = size * shard if model.cross_entropy == CrossEntropy.chunked else 4 * shard
    return vocabulary + 3 * tokens * model.hidden_size * size


def _optimizer_bytes(cfg: TrainConfig) -> int:
    """Optimizer state per trained parameter: Adam's moments or SGD's momentum, and fp32 master weights under
    bf16/fp16."""
    moments = 8 if cfg.optim.name == OptimizerName.adam else 4
    return moments + (4 if cfg.precision.dtype != DType.fp32 else 0)


def saves_adapters_alone(lora: LoraConfig, has_init_from: bool) -> bool:
    """Whether a run's checkpoints leave the frozen weights to its base (`lora.checkpoint`; `auto` does when the run
    starts from other weights)."""
    return lora.enabled and (
        lora.checkpoint == LoraCheckpoint.adapters or (lora.checkpoint == LoraCheckpoint.auto and has_init_from)
    )


def checkpoint_bytes(cfg: TrainConfig, has_init_from: bool) -> int:
    """One checkpoint of `cfg`'s run on disk (see the module docstring); `has_init_from`: the run starts from other
    weights, which an adapters-only LoRA checkpoint leaves out."""
    model, lora = cfg.model, cfg.lora
    adapters = model.num_layers * _layer_adapters(model, 1, lora)
    trained = adapters if lora.enabled else model.num_parameters(padded=True)
    weights = trained if saves_adapters_alone(lora, has_init_from) else model.num_parameters(padded=True) + adapters
    return weights * DTYPE_BYTES[cfg.precision.dtype] + trained * _optimizer_bytes(cfg)


def weights_bytes(cfg: TrainConfig) -> int:
    """The run's weights alone on disk, in the compute dtype: what `recipes/convert.py to=steerlm` writes."""
    return cfg.model.num_parameters(padded=True) * DTYPE_BYTES[cfg.precision.dtype]


def estimate_memory(cfg: TrainConfig, data_parallel_size: int) -> MemoryEstimate:
    """The busiest rank's memory for `cfg` at `data_parallel_size` (see the module docstring for what counts)."""
    parallel, precision, trainer, model = cfg.parallel, cfg.precision, cfg.trainer, cfg.model
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    size = DTYPE_BYTES[precision.dtype]
    per_parameter = _optimizer_bytes(cfg)
    optimizer_share = data_parallel_size if parallel.use_distributed_optimizer else 1
    micro_batches = trainer.global_batch_size // (trainer.micro_batch_size * data_parallel_size)
    tokens = trainer.micro_batch_size * trainer.seq_length // parallel.context_parallel_size
    kept, recomputed = _stage_activations(model, tokens, trainer.seq_length, tp, pp, parallel.sequence_parallel, size)
    stages = []
    adapters = model.num_layers // pp * _layer_adapters(model, tp, cfg.lora)
    for first, last in {(True, pp == 1), (pp == 1, True)}:
        parameters = stage_parameters(model, tp, pp, first, last) + adapters
        trained = adapters if cfg.lora.enabled else parameters
        in_flight = min(pp, micro_batches) if first else 1  # 1F1B: stage k holds pp - k micro-batches
        stages.append(
            MemoryEstimate(
                parameters=parameters,
                weights=parameters * size,
                gradients=trained * (4 if precision.grad_reduce_in_fp32 else size),
                optimizer=trained * per_parameter / optimizer_share,
                activations=in_flight * kept + recomputed + (loss_activations(model, tokens, tp, size) if last else 0),
                in_flight=in_flight,
                recomputed=recomputed,
            )
        )
    return max(stages, key=lambda stage: stage.total)


def job_memory(config, data_parallel_size: int) -> MemoryEstimate | None:
    """The estimate for a recipe's typed config, or None for a recipe that does not train."""
    return estimate_memory(config, data_parallel_size) if isinstance(config, TrainConfig) else None


def job_checkpoint(config) -> str | None:
    """One checkpoint's size for a recipe's typed config, as the dry run prints it (None: a recipe that does not
    train). Its `<stage>.init_from` (SFT, APM, pretraining) tells whether LoRA's `auto` saves the adapters alone."""
    if not isinstance(config, TrainConfig):
        return None
    has_init_from = any(
        getattr(getattr(config, stage, None), "init_from", None) for stage in ("sft", "apm", "pretrain")
    )
    kind = "LoRA adapters alone" if saves_adapters_alone(config.lora, has_init_from) else "weights and optimizer state"
    size, alone = checkpoint_bytes(config, has_init_from) / GIB, weights_bytes(config) / GIB
    return (
        f"one checkpoint on disk (estimate): {size:.2f} GiB, {kind}, times checkpoint.keep_last; "
        f"the weights alone (recipes/convert.py to=steerlm): {alone:.2f} GiB"
    )


# (preset, parallel option, data-parallel size, sequence length): each preset at the layout docs/launching.md
# launches it with, bf16, micro-batch 1, global batch 128.
PRESET_LAYOUTS = (
    ("tiny", "single", 1, 512),
    ("small", "single", 1, 2048),
    ("llama3_2_1b", "single", 8, 4096),
    ("llama2_7b", "tp8", 4, 4096),
    ("llama3_8b", "tp8", 4, 4096),
    ("llama3_1_8b", "tp8", 4, 4096),
    ("llama2_13b", "tp8", 4, 4096),
    ("llama2_70b", "tp8_pp2", 2, 4096),
    ("llama3_70b", "tp8_pp2", 2, 4096),
    ("nemotron3_8b", "tp8", 4, 4096),
    ("nemotron4_340b", "tp8_pp8", 2, 4096),
    ("qwen2_5_7b", "tp4", 8, 4096),
    ("mistral_7b", "tp8", 4, 4096),
    ("qwen3_8b", "tp8", 4, 4096),
    ("phi4", "tp2_pp2", 2, 4096),
    ("gemma_7b", "tp8", 4, 4096),
    ("gemma2_9b", "tp8", 4, 4096),
    ("gemma2_27b", "tp8_pp2", 2, 4096),
    ("gemma3_1b", "single", 8, 4096),
    ("gemma3_27b", "tp8_pp2", 2, 4096),
)


def preset_table() -> str:
    """Markdown table of `estimate_memory` for `PRESET_LAYOUTS`, with the plain and the distributed optimizer, and
    with the distributed optimizer and every layer recomputed (`model.recompute=uniform`)."""
    from steerlm.config import compose, to_typed

    rows = [
        "| preset | layout | weights | gradients | optimizer (plain / distributed) | activations | total per GPU "
        "(plain / distributed) | distributed, layers recomputed: activations, total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, parallel, dp, seq in PRESET_LAYOUTS:
        overrides = [f"model={preset}", f"parallel={parallel}", "precision=bf16", "trainer.micro_batch_size=1"]
        overrides += ["trainer.global_batch_size=128", f"trainer.seq_length={seq}"]
        plain = estimate_memory(to_typed(compose("demo", overrides)), dp)
        overrides.append("parallel.use_distributed_optimizer=true")
        sharded = estimate_memory(to_typed(compose("demo", overrides)), dp)
        lean = estimate_memory(to_typed(compose("demo", [*overrides, "model.recompute=uniform"])), dp)
        rows.append(
            f"| `{preset}` | `{parallel}` dp {dp}, seq {seq} | {plain.weights / GIB:.1f} GiB | "
            f"{plain.gradients / GIB:.1f} GiB | {plain.optimizer / GIB:.1f} / {sharded.optimizer / GIB:.1f} GiB | "
            f"{plain.activations / GIB:.1f} GiB | {plain.total / GIB:.1f} / {sharded.total / GIB:.1f} GiB | "
            f"{lean.activations / GIB:.1f} GiB, {lean.total / GIB:.1f} GiB |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(preset_table())
