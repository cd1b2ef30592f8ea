"""Typed configuration schemas shared by every recipe.

Field names follow Megatron/NeMo (`tensor_model_parallel_size`, `micro_batch_size`, `num_query_groups`,
...) so users can carry their habits over. Each dataclass checks what it can know on its own in
`validate()`; checks that need the world size or the device live in `steerlm.config.validation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

# re-exported: callers import these from steerlm.config.schema
from steerlm.config.attributes import AttributesConfig
from steerlm.config.lora import LoraConfig
from steerlm.config.model import (  # noqa: F401
    MODEL_FIELDS_ADDED,
    MODEL_SHAPE_FIELDS,
    Activation,
    CrossEntropy,
    ModelConfig,
    Normalization,
    PositionEmbedding,
    Recompute,
    TransformerImpl,
    require_positive,
    written_model_field,
)
from steerlm.config.sources import (  # noqa: F401
    HF_CONFIG_FILE,
    NEMO_CONFIG_FILE,
    STEERLM_CHECKPOINT_FILE,
    is_hf_model_dir,
    is_nemo_archive,
    validate_init_from,
)
from steerlm.data.attributes import AttributeSchema
from steerlm.data.lengths import LengthPolicy
from steerlm.data.readers import BadRowPolicy, DataFormat
from steerlm.data.synthetic.sizes import SyntheticConfig
from steerlm.data.template import Tokenization
from steerlm.errors import ConfigError, require, require_distinct_output


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Accelerator(str, Enum):
    """The device a run computes on (detected by `steerlm.runtime.detect_accelerator`)."""

    cpu = "cpu"
    cuda = "cuda"


class Backend(str, Enum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class CpuMatmul(str, Enum):
    """Who computes fp32 products of megatron's linear layers on the CPU (`steerlm.runtime.cpu_matmul`)."""

    auto = "auto"  # oneDNN on AMD x86 CPUs, torch's BLAS elsewhere
    onednn = "onednn"
    blas = "blas"  # torch's BLAS: MKL in x86 wheels


class OptimizerName(str, Enum):
    adam = "adam"
    sgd = "sgd"


class LRDecayStyle(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class ParallelConfig:
    """How the world is split: tensor, pipeline, context and (derived) data parallelism."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_size: Optional[int] = None  # None: world_size / (tp * pp * cp)
    use_distributed_optimizer: bool = False
    distributed_backend: Backend = Backend.auto
    distributed_timeout_minutes: int = 30
    cpu_matmul: CpuMatmul = CpuMatmul.auto  # without CUDA: oneDNN or BLAS for megatron's fp32 linear products
    cpu_reproducible: bool = True  # without CUDA: MKL's products independent of thread count (steerlm.runtime.mkl)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def validate(self) -> None:
        require_positive(
            "parallel",
            self,
            (
                "tensor_model_parallel_size",
                "pipeline_model_parallel_size",
                "context_parallel_size",
                "distributed_timeout_minutes",
            ),
        )
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel",
            self.sequence_parallel,
            "sequence parallelism splits activations across the tensor-parallel group and needs "
            "tensor_model_parallel_size > 1",
            "set parallel.sequence_parallel=false or parallel.tensor_model_parallel_size >= 2",
        )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            require(
                vpp >= 1,
                "parallel.virtual_pipeline_model_parallel_size",
                vpp,
                "must be >= 1",
                "use null to disable the interleaved schedule",
            )
            require(
                vpp == 1 or self.pipeline_model_parallel_size >= 2,
                "parallel.virtual_pipeline_model_parallel_size",
                vpp,
                "the interleaved schedule needs pipeline_model_parallel_size >= 2",
                "set parallel.virtual_pipeline_model_parallel_size=null or pipeline_model_parallel_size >= 2",
            )
        if self.data_parallel_size is not None:
            require(
                self.data_parallel_size >= 1,
                "parallel.data_parallel_size",
                self.data_parallel_size,
                "must be >= 1",
                "use null to derive it from the world size",
            )


@dataclass
class PrecisionConfig:
    """Compute dtype; fp32 master weights and (by default) fp32 gradient reduction under bf16/fp16."""

    dtype: DType = DType.fp32
    grad_reduce_in_fp32: bool = True
    initial_loss_scale: float = 4294967296.0  # fp16 only: dynamic loss scaling starts here
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000

    def validate(self) -> None:
        if self.dtype == DType.fp16:
            require(
                self.initial_loss_scale > 0,
                "precision.initial_loss_scale",
                self.initial_loss_scale,
                "must be positive",
                "use 2**32 (the Megatron default)",
            )
            require(
                0 < self.min_loss_scale <= self.initial_loss_scale,
                "precision.min_loss_scale",
                self.min_loss_scale,
                "must be in (0, initial_loss_scale]",
                "use 1.0",
            )
            require(
                self.loss_scale_window > 0,
                "precision.loss_scale_window",
                self.loss_scale_window,
                "must be positive",
                "use 1000",
            )


@dataclass
class OptimizerConfig:
    """Megatron optimizer and LR schedule (warmup, then decay to min_lr)."""

    name: OptimizerName = OptimizerName.adam
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0  # 0 disables clipping
    fused: bool = True  # torch's fused Adam/SGD kernel (HF Trainer's default); false: torch's default kernels
    lr_warmup_steps: int = 0
    lr_decay_style: LRDecayStyle = LRDecayStyle.cosine
    lr_decay_steps: Optional[int] = None  # None: trainer.max_steps

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", self.lr, "must be positive", "use e.g. 3e-4")
        require(
            0 <= self.min_lr <= self.lr,
            "optim.min_lr",
            self.min_lr,
            f"must be in [0, optim.lr={self.lr}]",
            "lower optim.min_lr",
        )
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0", "use 0.0 to disable")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, f"optim.{name}", value, "must be in [0, 1)", "use 0.9 / 0.95")
        require(self.adam_eps > 0, "optim.adam_eps", self.adam_eps, "must be positive", "use 1e-8")
        require(self.clip_grad >= 0, "optim.clip_grad", self.clip_grad, "must be >= 0", "use 0 to disable clipping")
        require(self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", self.lr_warmup_steps, "must be >= 0", "use 0")
        if self.lr_decay_steps is not None:
            require(
                self.lr_decay_steps > self.lr_warmup_steps,
                "optim.lr_decay_steps",
                self.lr_decay_steps,
                f"must exceed optim.lr_warmup_steps={self.lr_warmup_steps}",
                "raise it or use null",
            )


@dataclass
class TrainerConfig:
    """Batch geometry and run length (Megatron definitions: global = micro x dp x accumulation)."""

    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    max_steps: int = 20
    seed: int = 1234
    log_interval: int = 5
    eval_interval: Optional[int] = None  # steps between validations; None: only after the last step
    max_time_minutes: Optional[float] = None  # stop (and checkpoint) after this much wall time
    torch_threads: Optional[int] = None  # None: torch's default
    # torch.compile each transformer layer; None: on with CUDA at tensor_model_parallel_size=1, off otherwise
    # (measured on 2 CPU cores: no gain, minutes of compilation; TP>1 under compile is untested)
    torch_compile: Optional[bool] = None
    nan_tolerance: int = 0  # steps with a NaN/Inf loss or gradient skipped (no update) before training stops

    def validate(self) -> None:
        require_positive(
            "trainer", self, ("micro_batch_size", "global_batch_size", "seq_length", "max_steps", "log_interval")
        )
        require(
            self.nan_tolerance >= 0,
            "trainer.nan_tolerance",
            self.nan_tolerance,
            "must be >= 0",
            "use 0 to stop at the first non-finite step",
        )
        if self.eval_interval is not None:
            require(
                self.eval_interval > 0,
                "trainer.eval_interval",
                self.eval_interval,
                "must be positive",
                "use null to validate only after the last step",
            )
        if self.max_time_minutes is not None:
            require(
                self.max_time_minutes > 0,
                "trainer.max_time_minutes",
                self.max_time_minutes,
                "must be positive",
                "use null for no time limit",
            )
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "trainer.global_batch_size",
            self.global_batch_size,
            f"not divisible by trainer.micro_batch_size={self.micro_batch_size}",
            "make the global batch a multiple of micro_batch_size x data-parallel size",
        )
        if self.torch_threads is not None:
            require(
                self.torch_threads >= 1,
                "trainer.torch_threads",
                self.torch_threads,
                "must be >= 1",
                "use null for torch's default",
            )


@dataclass
class PrepareDataConfig:
    """`recipes/prepare_data.py`: convert a dataset to conversation JSONL and summarise it, or (with
    `data=synthetic`) generate the built-in synthetic world into the directory `output`."""

    format: DataFormat = DataFormat.conversation
    input: Optional[str] = None
    output: str = MISSING
    attributes: AttributesConfig = field(default_factory=AttributesConfig)
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    rejects: Optional[str] = None  # rejects file for on_bad_row=reject; None: <output>.rejects.jsonl
    synthetic: Optional[SyntheticConfig] = None  # set by data=synthetic

    def validate(self) -> None:
        self.attributes.validate()
        if self.synthetic is not None:
            self.synthetic.validate()
            require(
                not Path(self.output).is_file(),
                "output",
                self.output,
                "is a file",
                "data=synthetic writes a directory: pass output=<directory>",
            )
            return
        if self.input is None or not Path(self.input).is_file():
            raise ConfigError(
                "input",
                self.input,
                "no such file",
                "pass input=<path of a .jsonl, .jsonl.gz or .parquet file> (or data=synthetic)",
            )
        require_distinct_output(self.output, self.input)


class TokenizerType(str, Enum):
    hf = "hf"  # a Hugging Face tokenizer directory (tokenizer.json or tokenizer.model)
    word = "word"  # steerlm's word-level tokenizer (word_vocab.json), e.g. data/synthetic/tokenizer


@dataclass
class TokenizerConfig:
    type: TokenizerType = TokenizerType.word
    path: str = MISSING

    def validate(self) -> None:
        require(
            Path(self.path).is_dir(),
            "tokenizer.path",
            self.path,
            "is not a directory",
            "pass tokenizer.path=<local tokenizer directory> (data=synthetic writes data/synthetic/tokenizer)",
        )


@dataclass
class TemplateOptions:
    """How the SteerLM template becomes token ids (docs/template_and_batching.md, "Tokens"); saved with every
    checkpoint, so generation, scoring, chat, the server and the steering evaluation use the trained mode."""

    # markers: <extra_id_0/1/2> single added ids, BOS first; nemo: NeMo-Aligner's ids (one encode call, plain-text
    # markers, no BOS) and its chat-SFT loss mask, for models trained by NeMo-Aligner
    tokenization: Tokenization = Tokenization.markers

    def validate(self, tokenizer: TokenizerConfig) -> None:
        require(
            self.tokenization == Tokenization.markers or tokenizer.type == TokenizerType.hf,
            "template.tokenization",
            self.tokenization.value,
            f"keeps <extra_id_0/1/2> plain text, which the {tokenizer.type.value} tokenizer cannot encode",
            "use tokenizer.type=hf (the model's own tokenizer directory), or template.tokenization=markers",
        )


@dataclass
class TrainDataConfig:
    """Training data of a stage: a file in any reader format, and where validation rows come from."""

    train_file: str = MISSING
    format: DataFormat = DataFormat.conversation
    validation_file: Optional[str] = None
    validation_fraction: float = 0.1  # held out from train_file when validation_file is null
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    length_policy: LengthPolicy = LengthPolicy.drop  # too long for trainer.seq_length: drop or cut

    def validate(self, check_files: bool = True) -> None:
        for key in ("train_file", "validation_file"):
            path = getattr(self, key)
            if path is not None and check_files:
                require(
                    Path(path).is_file(),
                    f"data.{key}",
                    path,
                    "no such file",
                    "generate the default with `python recipes/prepare_data.py data=synthetic` or pass a file",
                )
        require(
            0.0 <= self.validation_fraction < 1.0,
            "data.validation_fraction",
            self.validation_fraction,
            "must be in [0, 1)",
            "use 0.1, or give data.validation_file",
        )


class APMType(str, Enum):
    regression = "regression"  # a linear head on the last response token regresses every attribute (NeMo-Aligner)
    generative = "generative"  # the LM writes the attribute string after the response (the SteerLM paper)


def require_one_per_attribute(key: str, weights: list[float], schema: AttributeSchema, null_means: str) -> None:
    names = ", ".join(schema.attributes)
    require(
        len(weights) == len(schema.attributes),
        key,
        weights,
        f"needs one weight per attribute of schema '{schema.name}' ({len(schema.attributes)}: {names})",
        f"give {len(schema.attributes)} weights in the order {names}, or {key}=null for {null_means}",
    )


def validate_merge_weights(key: str, weights: Optional[list[float]], schema: AttributeSchema) -> None:
    """One finite weight per attribute in schema order, not all zero (the reward would be constant)."""
    if weights is None:
        return
    require_one_per_attribute(key, weights, schema, "no reward")
    require(
        all(math.isfinite(w) for w in weights),
        key,
        weights,
        "weights must be finite numbers",
        "replace inf/nan by a number (negative weights are allowed, e.g. for verbosity)",
    )
    require(
        any(w != 0 for w in weights),
        key,
        weights,
        "all weights are 0, so the reward would always be 0",
        f"give at least one attribute a non-zero weight, or {key}=null for no reward",
    )


@dataclass
class APMConfig:
    type: APMType = APMType.regression
    attribute_weights: Optional[list[float]] = None  # per-attribute loss weights (schema order); null: all 1
    # NeMo-Aligner's attribute_weights: reward = sum of weight x raw score (schema order); null: no reward, or
    # with merge_attributes NeMo's uniform 1/k
    merge_weights: Optional[list[float]] = None
    merge_attributes: bool = False  # NeMo-Aligner's merge_attributes: report the merged reward (see merge_weights)
    init_from: Optional[str] = (
        None  # a steerlm run dir / checkpoint, an HF Llama dir or a .nemo: its weights start the run
    )

    def reward_weights(self, schema: AttributeSchema) -> Optional[list[float]]:
        """The merged reward's weights: `merge_weights`, else NeMo-Aligner's uniform 1/k when `merge_attributes`
        asks for a reward, else None (no reward)."""
        if self.merge_weights is not None:
            return list(self.merge_weights)
        count = len(schema.attributes)
        return [1.0 / count] * count if self.merge_attributes else None

    def validate(self, schema: AttributeSchema, check_files: bool = True) -> None:
        require(
            self.type == APMType.regression or self.attribute_weights is None,
            "apm.attribute_weights",
            self.attribute_weights,
            "weights the regression loss; a generative APM's loss is over tokens",
            "apm.attribute_weights=null with apm.type=generative",
        )
        if self.attribute_weights is not None:
            require_one_per_attribute("apm.attribute_weights", self.attribute_weights, schema, "weight 1 for all")
            require(
                all(w >= 0 for w in self.attribute_weights),
                "apm.attribute_weights",
                self.attribute_weights,
                "weights must be >= 0",
                "use 0 to ignore an attribute",
            )
        validate_merge_weights("apm.merge_weights", self.merge_weights, schema)
        if check_files:
            validate_init_from("apm.init_from", self.init_from)


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (megatron dist_checkpointing) under `<output_dir>/checkpoints`."""

    save_interval: Optional[int] = None  # steps between saves; None: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2  # older checkpoints are deleted once a newer one is complete
    resume: bool = True  # continue from `<output_dir>/checkpoints/latest` when it exists
    # a SHA-256 of every file at save, checked before a resume (a damaged latest: the newest intact one is used);
    # false skips both, for checkpoints so large that hashing them costs minutes
    verify: bool = True
    # scheduled saves written by a forked process while training goes on (the loop waits only for the fork, and
    # on a GPU the copy to host memory); the last save and a signal's are written before the run ends
    async_save: bool = False

    def validate(self) -> None:
        if self.save_interval is not None:
            require(
                self.save_interval > 0,
                "checkpoint.save_interval",
                self.save_interval,
                "must be positive",
                "use null to save only at the end and on signals",
            )
        require(
            self.keep_last >= 1,
            "checkpoint.keep_last",
            self.keep_last,
            "must be >= 1",
            "keep at least the latest checkpoint",
        )


@dataclass
class TrainConfig:
    """Root of a training recipe's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output_dir: str = "runs/demo"

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        """The one validation entry of a training recipe's config, called before anything is built: every
        section and every check across sections, for a launch of `world_size` processes on `accelerator`.
        Returns the data-parallel size. Subclasses add their own sections.

        `this_machine=False` validates a job planned here to run elsewhere (a Slurm login node has no GPU,
        and an earlier stage of the pipeline has not yet written this stage's inputs): checks of this
        machine's GPU and packages and of input files are left to the job, which validates again at start.
        """
        from steerlm.config.validation import validate_train_config  # validation imports this module

        return validate_train_config(self, world_size, accelerator, this_machine)


@dataclass
class LabelledDataTrainConfig(TrainConfig):
    """A training recipe on attribute-labelled conversations: the schema, the tokenizer, the data."""

    attributes: AttributesConfig = field(default_factory=AttributesConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    template: TemplateOptions = field(default_factory=TemplateOptions)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        dp = super().validate(world_size, accelerator, this_machine)
        self.attributes.validate()
        self.template.validate(self.tokenizer)
        self.data.validate(check_files=this_machine)
        if this_machine:
            self.tokenizer.validate()
        return dp


@dataclass
class AttributeModelConfig(LabelledDataTrainConfig):
    """`recipes/train_attribute_model.py`: the regression Attribute Prediction Model."""

    apm: APMConfig = field(default_factory=APMConfig)

    def validate(
        self, world_size: int = 1, accelerator: Accelerator = Accelerator.cpu, this_machine: bool = True
    ) -> int:
        dp = super().validate(world_size, accelerator, this_machine)
        self.apm.validate(self.attributes.schema(), check_files=this_machine)
        return dp


def require_apm_checkpoint(path: str) -> None:
    """`apm_checkpoint` of the recipes that read an APM (annotate, evaluate_attribute_model) must be a directory;
    what it holds is checked when it is loaded."""
    require(
        Path(path).is_dir(),
        "apm_checkpoint",
        path,
        "is not a directory",
        "pass the output_dir of recipes/train_attribute_model.py (or one of its checkpoints)",
    )
