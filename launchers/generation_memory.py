"""Memory per GPU of a job that generates with or scores by trained models, estimated before it is submitted.

    python -m launchers serve checkpoint=runs/sft parallel=tp8 precision=bf16 --dry-run

Training jobs are sized by `launchers.memory`; the recipes here load trained checkpoints instead (`serve`, `chat`,
`evaluate_steering`, `bootstrap`'s sampling and labelling, `prepare_steerlm2`, `annotate`,
`evaluate_attribute_model`), so the model comes from each checkpoint's saved `config.yaml` (no weights read, no
torch), and the job's config says how many rows run together and how long they grow. Per model a phase holds, on
the busiest rank (each model built at the job's layout):

- **weights**: the parameters of the busiest pipeline stage's TP shard (`launchers.memory`'s count), in the
  precision the model runs at (the recipe's `precision` for a generating model; an APM its own);
- **KV cache** of a generating model: keys and values of every row at every position it may reach
  (`2 x layers/pp x rows x positions x groups/tp x head_dim`); the lean decoder grows it one layer at a time, so
  rows joining or leaving add one layer's copy, not the whole cache;
- **working memory**, the largest transient: a prefill of every row at once at the longest prompt, in the lean
  decoder's chunks of at most `prefill_tokens` tokens (`limits.prefill_tokens` of a server; 8192 elsewhere), as it
  computes them (SwiGLU's `[gate; up]`, the activation and the product, beside the residual stream and its
  norm: `tokens x (4 ffn/tp + 2 hidden)`; an ungated MLP's input, activation and output, Nemotron's squared ReLU:
  `3 ffn/tp + 2 hidden`; checked against real prefills in tests/test_generation_memory.py), or a scoring forward
  through megatron's layers (`tokens x (5 ffn/tp + 4 hidden)`, ungated `3 ffn/tp + 4 hidden`; both measured),
  plus the logits a language model makes (the prefill's at each row's last
  position, in the compute dtype and in fp32 for sampling; a log-probability forward's loss as
  `launchers.memory` counts it in training). Where the heads are much wider than the hidden size (Qwen3-0.6B: 2 x
  hidden) attention's transients are the larger: with `q = heads x head_dim / tp` and `kv = groups x head_dim / tp`,
  the lean decoder's RoPE of the queries holds `6 q + 2 kv + 2 hidden` a token (the packed projection, the query
  heads' copy and RoPE's four temporaries), megatron's layers `5 q + 2 kv + 3 hidden`, QK norms one more `kv` (the
  normed keys; measured on heads 2-8 x hidden, within 2 %); for Llama shapes (`ffn` >= 2.7 x hidden, heads x
  head_dim = hidden) the MLP's are. Not counted: with such wide heads a prefill in chunks, whose attention reads
  the keys and values already cached, holds more still (1.1-1.8x the estimate with 4 query heads a group, up to
  5.9x without grouping, heads 4 x hidden, 8 rows in chunks of 8 positions; measured 2026-12-05), so size those
  with `prefill_tokens` at least the rows' prompts. A chunked prefill holds a chunk's
  causal mask, and on GPUs grouped-query attention with that mask adds the mask tiled over a group's heads or one
  layer's keys and values repeated, whichever is less (`working_bytes`).

Models a phase holds at once add their weights and caches; their transients do not overlap (one runs at a time).
Phases that load models one after another (bootstrap: sample, then label, then fine-tune) are reported each, the
fine-tuning by `launchers.memory`. A checkpoint not written yet (a pipeline's later stage), or a `.nemo` archive
(its vocabulary is in its weights), is named instead of estimated. Not counted: the CUDA context and
communication buffers (plan 3-6 GiB more), LoRA adapters of serving profiles, the tokenizer and the HTTP server.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from launchers.memory import DTYPE_BYTES, GIB, loss_activations, stage_parameters
from steerlm.config import DType, ModelConfig, ParallelConfig, PrecisionConfig, to_typed
from steerlm.config.annotate import AnnotateConfig, JudgeConfig
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig
from steerlm.config.inference import PREFILL_TOKENS, InferenceConfig, ServeConfig
from steerlm.config.sources import is_nemo_archive, saved_config_file
from steerlm.config.steering import SteeringEvalConfig
from steerlm.config.steerlm2 import PrepareSteerLM2Config

SCORING_ROWS = 16  # AttributeScorer's micro-batch where a recipe sets none (the server's /v1/attributes/score)


class Role(str, Enum):
    """What a model computes in a phase."""

    generates = "generates"  # the lean decoder: a prefill in chunks, then decode steps over a KV cache
    scores = "scores"  # an APM's forward through megatron's layers
    log_probabilities = "log-probabilities"  # a language model's forward with labels (its loss head)


@dataclass(frozen=True)
class Workload:
    """One model's part in a phase: what it computes, on how many rows, of how many positions."""

    role: Role
    key: str  # the config key naming its checkpoint
    path: str
    rows: int  # rows computed together
    positions: Optional[int] = None  # the longest a row grows (prompt and answer); None: the model's context
    answer: int = 0  # positions a row generates: a prefill reads the other `positions - answer` at once
    dtype: Optional[DType] = None  # None: the checkpoint's own training precision
    prefill_tokens: int = PREFILL_TOKENS  # a generating model's prefill computes this many tokens a forward at most

    def within(self, model: ModelConfig) -> Workload:
        """This workload on `model`: a row grows at most to its context."""
        context = model.max_position_embeddings
        return replace(self, positions=min(self.positions or context, context))

    @property
    def length(self) -> int:
        assert self.positions is not None, "sized against a model first (`within`)"
        return self.positions

    @property
    def prompt(self) -> int:
        return max(1, self.length - self.answer)

    @property
    def at_once(self) -> int:
        """Positions of every row one forward computes: a generating model prefills in chunks of `prefill_tokens`
        tokens (at least one position a row), a scoring forward reads whole rows."""
        if self.role != Role.generates:
            return self.prompt
        return min(self.prompt, max(1, self.prefill_tokens // self.rows))


@dataclass(frozen=True)
class HeldModel:
    """Bytes one model holds on the busiest rank."""

    workload: Workload
    parameters: int
    weights: float
    cache: float
    working: float

    def describe(self) -> str:
        w = self.workload
        cache = f" + KV cache {self.cache / GIB:.1f} ({w.rows} rows x {w.positions} positions)" if self.cache else ""
        return (
            f"{w.key}={w.path} ({w.role.value}, {self.parameters / 1e9:.2f}B parameters): weights "
            f"{self.weights / GIB:.1f} GiB{cache}, its largest transient {self.working / GIB:.1f} "
            f"({w.rows} rows x {w.at_once} positions at once)"
        )


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    models: tuple[HeldModel, ...]
    unknown: tuple[str, ...]  # checkpoints not sized, each with the reason

    @property
    def total(self) -> float:
        held = sum(m.weights + m.cache for m in self.models)
        return held + max((m.working for m in self.models), default=0.0)

    def describe(self) -> str:
        lines = [f"memory per GPU while {self.name} (estimate, busiest rank):"]
        lines += [f"  {model.describe()}" for model in self.models]
        lines += [f"  {reason}" for reason in self.unknown]
        total = f"  = {self.total / GIB:.1f} GiB"
        if self.unknown:
            total += " for the models sized"
        return "\n".join([*lines, total + ", plus 3-6 GiB of CUDA context and communication buffers"])


def kv_cache_bytes(model: ModelConfig, parallel: ParallelConfig, rows: int, positions: int, size: int) -> int:
    """Keys and values of `rows` rows of `positions` positions on one rank."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    return 2 * (model.num_layers // pp) * rows * positions * (model.query_groups // tp) * model.head_dim * size


def _per_token(model: ModelConfig, tp: int, lean: bool) -> int:
    """Elements the largest transient of a layer holds per token: its MLP's or its attention's, whichever is larger
    (module docstring)."""
    gated = model.gated_mlp
    queries = model.num_attention_heads * model.head_dim // tp
    keys = (3 if model.qk_layernorm else 2) * model.query_groups * model.head_dim // tp
    if lean:
        mlp = (4 if gated else 3) * model.ffn_hidden_size // tp + 2 * model.hidden_size
        return max(mlp, 6 * queries + keys + 2 * model.hidden_size)
    mlp = (5 if gated else 3) * model.ffn_hidden_size // tp + 4 * model.hidden_size
    return max(mlp, 5 * queries + keys + 3 * model.hidden_size)


def working_bytes(model: ModelConfig, parallel: ParallelConfig, workload: Workload, size: int, cuda: bool) -> float:
    """The largest transient of `workload` on one rank (module docstring). A prefill in chunks also holds a chunk's
    boolean causal mask. `cuda`: masked attention (prefill chunks after the first) runs in the memory-efficient
    kernel, which takes no grouped key/value heads, so `grouped_sdpa` repeats one layer's keys and values to the
    query heads or tiles the mask over them, whichever holds less (decode steps always tile: their mask is a row)."""
    tp = parallel.tensor_model_parallel_size
    tokens = workload.rows * workload.at_once
    vocabulary = model.padded_vocab_size
    if workload.role == Role.generates:
        layers = tokens * _per_token(model, tp, lean=True) * size
        logits = workload.rows * vocabulary * (2 * size + 2 * 4)  # shards and gathered; fp32 for sampling
        mask = workload.at_once * workload.length if workload.prompt > workload.at_once else 0
        heads, groups = model.num_attention_heads // tp, model.query_groups // tp
        repeat = 2 * workload.rows * heads * workload.length * model.head_dim * size
        grouped = min(heads // groups * mask, repeat) if cuda and groups < heads else 0
        return max(layers, logits) + mask + grouped
    layers = tokens * _per_token(model, tp, lean=False) * size
    loss = loss_activations(model, tokens, tp, size) if workload.role == Role.log_probabilities else 0
    return float(max(layers, loss))


def held_model(
    model: ModelConfig, parallel: ParallelConfig, workload: Workload, dtype: DType, cuda: bool = True
) -> HeldModel:
    """What `model` holds on the busiest rank for `workload` (rows longer than its context are cut to it)."""
    workload = workload.within(model)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    size = DTYPE_BYTES[dtype]
    parameters = max(stage_parameters(model, tp, pp, first, last) for first, last in {(True, pp == 1), (pp == 1, True)})
    cache = (
        kv_cache_bytes(model, parallel, workload.rows, workload.length, size) if workload.role == Role.generates else 0
    )
    return HeldModel(
        workload, parameters, parameters * size, cache, working_bytes(model, parallel, workload, size, cuda)
    )


def saved_model(path: str) -> tuple[ModelConfig, DType] | str:
    """The model and training precision a steerlm checkpoint (or run directory) was saved with, or why not."""
    if is_nemo_archive(Path(path)):
        return "a .nemo archive (its vocabulary is in its weights): not sized; import it first to size it"
    file = saved_config_file(Path(path))
    if file is None:
        return "not written yet (a stage before this one writes it): not sized"
    try:
        saved = OmegaConf.load(file)
        model = to_typed(saved.model, ModelConfig)
        precision = to_typed(saved.precision, PrecisionConfig) if "precision" in saved else PrecisionConfig()
    except Exception as error:  # yaml's, OmegaConf's and the typed config's errors share no narrower base
        return f"{file} cannot be read ({type(error).__name__}: {error}): not sized"
    return model, precision.dtype


def estimate_phase(name: str, workloads: list[Workload], parallel: ParallelConfig, cuda: bool) -> PhaseEstimate:
    """Size the models of one phase against their checkpoints' saved configs."""
    models, unknown = [], []
    for workload in workloads:
        found = saved_model(workload.path)
        if isinstance(found, str):
            unknown.append(f"{workload.key}={workload.path}: {found}")
            continue
        model, trained = found
        models.append(held_model(model, parallel, workload, workload.dtype or trained, cuda))
    return PhaseEstimate(name, tuple(models), tuple(unknown))


def _judge(judge: JudgeConfig, key: str, positions: Optional[int]) -> list[Workload]:
    """The Bayes judge scores each response at every level of its attributes through shared-prefix prefills."""
    if judge.checkpoint is None:
        return []
    return [
        Workload(
            Role.generates,
            f"{key}.checkpoint",
            judge.checkpoint,
            judge.micro_batch_size,
            positions,
            0,
            judge.precision.dtype,
        )
    ]


def job_phases(config: object, cuda: bool) -> list[PhaseEstimate]:
    """The phases of a recipe's typed config that load trained models (empty for any other recipe); `cuda`: the
    job runs on GPUs (`working_bytes`)."""
    if isinstance(config, ServeConfig):
        limits = config.limits
        # a prompt may take all but one position of the context: the longest prefill
        work = [
            Workload(
                Role.generates,
                "checkpoint",
                config.checkpoint,
                limits.max_batch_size,
                None,
                1,
                config.precision.dtype,
                limits.prefill_tokens,
            )
        ]
        if config.apm_checkpoint:
            work.append(Workload(Role.scores, "apm_checkpoint", config.apm_checkpoint, SCORING_ROWS))
        return [estimate_phase("serving", work, config.parallel, cuda)]
    if isinstance(config, InferenceConfig):  # the chat: one row
        work = [Workload(Role.generates, "checkpoint", config.checkpoint, 1, None, 1, config.precision.dtype)]
        return [estimate_phase("chatting", work, config.parallel, cuda)]
    if isinstance(config, SteeringEvalConfig):
        work = [
            Workload(
                Role.generates,
                "checkpoint",
                config.checkpoint,
                config.batch_size,
                None,
                config.max_new_tokens,
                config.precision.dtype,
            )
        ]
        return [estimate_phase("generating", work, config.parallel, cuda)]
    if isinstance(config, BootstrapConfig):
        options, dtype = config.bootstrap, config.precision.dtype
        sample = Workload(
            Role.generates,
            "sft.init_from",
            str(config.sft.init_from),
            options.batch_size,
            None,
            options.max_new_tokens,
            dtype,
        )
        label = [
            Workload(Role.scores, "bootstrap.apm_checkpoint", options.apm_checkpoint, SCORING_ROWS),
            *_judge(options.judge, "bootstrap.judge", None),
        ]
        return [
            estimate_phase("sampling", [sample], config.parallel, cuda),
            estimate_phase("labelling", label, config.parallel, cuda),
        ]
    if isinstance(config, PrepareSteerLM2Config):  # its passes load one model each, one after another
        rows, dtype, q = config.micro_batch_size, config.precision.dtype, config.steerlm_checkpoint
        passes = {
            "sampling": Workload(Role.generates, "steerlm_checkpoint", q, rows, None, config.max_new_tokens, dtype),
            "computing log Q'(y|a,x)": Workload(Role.log_probabilities, "steerlm_checkpoint", q, rows, None, 0, dtype),
            "computing log P(y|x)": Workload(
                Role.log_probabilities, "plain_sft_checkpoint", config.plain_sft_checkpoint, rows, None, 0, dtype
            ),
            "computing log P(a|x,y)": Workload(Role.scores, "apm_checkpoint", config.apm_checkpoint, rows),
        }
        return [estimate_phase(name, [work], config.parallel, cuda) for name, work in passes.items()]
    if isinstance(config, AnnotateConfig):
        work = [
            Workload(Role.scores, "apm_checkpoint", config.apm_checkpoint, config.micro_batch_size, config.seq_length),
            *_judge(config.judge, "judge", config.seq_length),
        ]
        return [estimate_phase("annotating", work, config.parallel, cuda)]
    if isinstance(config, EvaluateAttributeModelConfig):
        work = [
            Workload(Role.scores, "apm_checkpoint", config.apm_checkpoint, config.micro_batch_size, config.seq_length)
        ]
        return [estimate_phase("scoring", work, config.parallel, cuda)]
    return []
