"""The model's shape: `ModelConfig` (the `model.*` keys), its enums, and which of its fields a checkpoint must share.

A module of its own so that everything that reads a model's shape (checkpoints, imports and exports, memory
estimates) depends on this alone; `steerlm.config.schema` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from steerlm.errors import require


class Normalization(str, Enum):
    RMSNorm = "RMSNorm"
    LayerNorm = "LayerNorm"


class Activation(str, Enum):
    swiglu = "swiglu"
    geglu = "geglu"  # GELU-gated with GELU's tanh approximation: Gemma's `gelu_pytorch_tanh`, megatron's fused geglu
    gelu = "gelu"
    squared_relu = "squared_relu"


class PositionEmbedding(str, Enum):
    rope = "rope"
    learned_absolute = "learned_absolute"


class TransformerImpl(str, Enum):
    """Which layer implementation builds the model.

    `auto` picks Transformer Engine when it is importable on a CUDA machine and megatron-core's own
    layers with a `scaled_dot_product_attention` core attention otherwise.
    """

    auto = "auto"
    local = "local"
    transformer_engine = "transformer_engine"


class CrossEntropy(str, Enum):
    """How the language-model loss is computed from the last hidden states.

    `chunked`: steerlm's vocabulary-parallel cross entropy a chunk of tokens at a time (fp32 logits never exist
    for the whole vocabulary; same loss and gradients; the positions the loss mask leaves out skip the output
    layer); `megatron`: the output layer's full logits, then megatron's `vocab_parallel_cross_entropy`.
    """

    chunked = "chunked"
    megatron = "megatron"


class Recompute(str, Enum):
    """Activation recomputation in training (megatron's `recompute_granularity=full`; NeMo's
    `activations_checkpoint_*`): layers whose activations are not kept for the backward but computed again from
    their input when it needs them. Costs about one more forward of those layers; a pipeline stage holding many
    micro-batches in flight then keeps one hidden state per recomputed chunk of layers instead of every tensor.

    `none`: keep every activation; `uniform`: every `model.recompute_num_layers` consecutive layers are one chunk
    whose input alone is kept (all layers recomputed); `block`: the first `model.recompute_num_layers` layers of each
    pipeline stage are recomputed one by one, the rest keep their activations.
    """

    none = "none"
    uniform = "uniform"
    block = "block"


def require_positive(prefix: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{prefix}.{name}", value, "must be positive", "set a value > 0")


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (megatron GPTModel)."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (groups = heads)
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 512  # the tokenizer's vocabulary, before padding
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 512
    normalization: Normalization = Normalization.RMSNorm
    # Norm weights stored centred on zero and applied as (1 + weight): NeMo's `layernorm1p` (Nemotron), megatron's
    # `layernorm_zero_centered_gamma`. Weight decay then pulls the scale towards one, not towards zero.
    layernorm_zero_centered_gamma: bool = False
    layernorm_epsilon: float = 1e-5
    activation: Activation = Activation.swiglu
    position_embedding_type: PositionEmbedding = PositionEmbedding.rope
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama-3.1 frequency scaling
    rope_scaling_factor: float = 8.0
    # LongRoPE (Phi-3.5-mini, Phi-4-mini, the 128k Phi-3s; `steerlm.models.rope`): each rotary channel pair's inverse
    # frequency is divided by its short factor, or by its long factor in a forward whose positions reach past
    # `rope_original_max_positions`. Both lists null (the default): no LongRoPE. An HF import fills them.
    rope_short_factor: Optional[list[float]] = None
    rope_long_factor: Optional[list[float]] = None
    # YaRN (Qwen2.5 / Qwen3 past 32k positions): the channel pairs that turn fewer than `rope_yarn_beta_slow` times over
    # `rope_original_max_positions` positions interpolated by `rope_yarn_factor`, those turning more than
    # `rope_yarn_beta_fast` times kept, a ramp between (rounded to whole pairs with `rope_yarn_truncate`), at every
    # length. Null (the default): no YaRN.
    rope_yarn_factor: Optional[float] = None
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_truncate: bool = True
    # Linear scaling (position interpolation): every inverse frequency divided by this factor, at every length —
    # transformers' `rope_type: linear` (DeepSeek-Coder, LongChat, Llama-2-7B-32K), NeMo's and megatron's
    # `seq_len_interpolation_factor`. Null (the default): none.
    rope_linear_factor: Optional[float] = None
    # LongRoPE's and YaRN's pretraining length, and what they multiply RoPE's cos and sin by (transformers'
    # `attention_factor`: an HF import sets the value transformers computes, e.g. 0.1 ln(factor) + 1 for YaRN)
    rope_original_max_positions: int = 4096
    rope_attention_factor: float = 1.0
    # The input embeddings multiplied by sqrt(hidden_size) (in the weights' dtype): Gemma's, NeMo's
    # `apply_embedding_scaling`.
    apply_embedding_scaling: bool = False
    share_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    # Biases on the query, key and value projections alone (megatron's `add_qkv_bias`, NeMo's `qkv_bias`): Qwen2's
    # attention. `add_bias_linear` puts biases on every linear layer, these included.
    add_qkv_bias: bool = False
    # A norm (`normalization`, `layernorm_epsilon`) over each query and key head before RoPE, one weight per head
    # channel shared by the heads (megatron's and NeMo's `qk_layernorm`): Qwen3's attention.
    qk_layernorm: bool = False
    # Gemma 2's layers (`steerlm.megatron_compat.gemma2`): a norm of the attention's and of the MLP's output before
    # each joins the residual stream (HF's `post_attention_layernorm` / `post_feedforward_layernorm`); attention
    # scores and the final logits soft-capped, `cap * tanh(x / cap)` (null: not capped); the attention scale
    # `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5` (null: the head's channels).
    post_sublayer_norms: bool = False
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    query_pre_attn_scalar: Optional[int] = None
    # Sliding-window attention (Mistral-7B-v0.1, Phi-3-mini, Gemma 2's even layers): a query attends to itself and the
    # `sliding_window - 1` positions before it (transformers' `sliding_window`); with `window_attn_skip_freq` N every
    # N-th layer (N, 2N, … counted from 1: Gemma 2's odd layers counted from 0) attends to every position (megatron's
    # name). Null: every layer attends to every position.
    sliding_window: Optional[int] = None
    window_attn_skip_freq: Optional[int] = None
    # Gemma 3's local RoPE: the sliding-window layers rotate with plain RoPE of this base (transformers 4's and
    # Megatron-Bridge's `rope_local_base_freq`; transformers 5's `rope_parameters.sliding_attention.rope_theta`), the
    # others with `rotary_base` and the model's scaling (Gemma-3-4B+'s linear factor 8 acts on them alone). Null: every
    # layer rotates alike.
    rope_local_base_freq: Optional[int] = None
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: TransformerImpl = TransformerImpl.auto
    cross_entropy: CrossEntropy = CrossEntropy.chunked
    recompute: Recompute = Recompute.none  # activation recomputation in training (`Recompute`)
    recompute_num_layers: int = 1  # layers per recomputed chunk (uniform) or recomputed per stage (block)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (`linear_fc1` holds [gate; up]: SwiGLU, GeGLU)."""
        return self.activation in (Activation.swiglu, Activation.geglu)

    @property
    def long_rope(self) -> bool:
        """Whether RoPE is LongRoPE's (`rope_short_factor` / `rope_long_factor`)."""
        return self.rope_short_factor is not None or self.rope_long_factor is not None

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to `make_vocab_size_divisible_by`.

        Unlike Megatron we do not also multiply the multiple by the TP size: the padded shape must
        not depend on the layout, so a checkpoint moves between TP sizes without re-padding. The
        validation refuses a TP size that does not divide the result.
        """
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded: bool = False) -> int:
        """Parameter count of the model (embeddings included), as HF counts it when unpadded."""
        vocab = self.padded_vocab_size if padded else self.vocab_size
        h, ffn, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q = self.num_attention_heads * d
        kv = 2 * self.query_groups * d
        attention = h * (q + kv) + q * h
        mlp = h * ffn * (3 if self.gated_mlp else 2)
        bias = (
            (q + kv + h + ffn * (2 if self.gated_mlp else 1) + h)
            if self.add_bias_linear
            else q + kv
            if self.add_qkv_bias
            else 0
        )
        per_norm = 2 if self.normalization == Normalization.LayerNorm else 1  # weight, and LayerNorm's bias
        sublayer_norms = 4 if self.post_sublayer_norms else 2
        norms_per_layer = sublayer_norms * h * per_norm + (2 * d * per_norm if self.qk_layernorm else 0)
        layer = attention + mlp + bias + norms_per_layer
        embeddings = vocab * h * (1 if self.share_embeddings_and_output_weights else 2)
        final_norm = h * (2 if self.normalization == Normalization.LayerNorm else 1)
        positions = (
            self.max_position_embeddings * h
            if self.position_embedding_type == PositionEmbedding.learned_absolute
            else 0
        )
        return self.num_layers * layer + embeddings + final_norm + positions

    def validate(self) -> None:
        require_positive(
            "model",
            self,
            (
                "num_layers",
                "hidden_size",
                "ffn_hidden_size",
                "num_attention_heads",
                "vocab_size",
                "make_vocab_size_divisible_by",
                "max_position_embeddings",
                "rotary_base",
                "layernorm_epsilon",
                "init_method_std",
                "recompute_num_layers",
            ),
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                "model.hidden_size",
                self.hidden_size,
                f"not divisible by model.num_attention_heads={self.num_attention_heads}",
                "choose a hidden size that is a multiple of the head count, or set model.kv_channels",
            )
        else:
            require(self.kv_channels > 0, "model.kv_channels", self.kv_channels, "must be positive", "set a value > 0")
        groups = self.query_groups
        require(
            groups > 0 and self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            self.num_query_groups,
            f"must divide model.num_attention_heads={self.num_attention_heads}",
            "use a divisor of the head count (null for multi-head attention)",
        )
        require(
            not (self.add_qkv_bias and self.add_bias_linear),
            "model.add_qkv_bias",
            self.add_qkv_bias,
            "is implied by model.add_bias_linear=true (biases on every linear layer, q/k/v included)",
            "set model.add_qkv_bias=false, or model.add_bias_linear=false for biases on q/k/v alone (Qwen2)",
        )
        require(
            0.0 < self.rotary_percent <= 1.0,
            "model.rotary_percent",
            self.rotary_percent,
            "must be in (0, 1]",
            "use 1.0 for Llama",
        )
        require(
            self.rotary_percent * self.head_dim % 2 == 0,
            "model.rotary_percent",
            self.rotary_percent,
            f"rotary dimension {self.rotary_percent * self.head_dim} must be an even integer",
            "pick a rotary_percent that gives an even number of rotary channels",
        )
        require(
            self.rope_scaling_factor >= 1.0,
            "model.rope_scaling_factor",
            self.rope_scaling_factor,
            "must be >= 1",
            "use 8 for Llama-3.1, 32 for Llama-3.2",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"model.{name}", value, "must be in [0, 1)", "use 0.0 for Llama")
        if self.long_rope:
            self._validate_long_rope()
        if self.rope_yarn_factor is not None:
            self._validate_yarn()
        if self.rope_linear_factor is not None:
            self._validate_linear()
        self._validate_window()
        if self.rope_local_base_freq is not None:
            self._validate_local_rope()
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, name)
            require(
                value is None or value > 0,
                f"model.{name}",
                value,
                "must be positive",
                "use Gemma 2's values from its config.json (50, 30 and the head's channels), or null",
            )

    def _validate_window(self) -> None:
        require(
            self.sliding_window is None or self.sliding_window > 0,
            "model.sliding_window",
            self.sliding_window,
            "must be positive (the positions a query attends to, itself included)",
            "copy sliding_window from the model's config.json, or null for full attention",
        )
        skip = self.window_attn_skip_freq
        require(
            skip is None or (skip > 1 and self.sliding_window is not None),
            "model.window_attn_skip_freq",
            skip,
            "must be at least 2, and needs model.sliding_window (every N-th layer attends to every position)",
            "use 2 for Gemma 2 (with its sliding_window), or null for a window on every layer",
        )

    def _validate_local_rope(self) -> None:
        require_positive("model", self, ("rope_local_base_freq",))
        off = "or model.rope_local_base_freq=null"
        require(
            self.sliding_window is not None,
            "model.rope_local_base_freq",
            self.rope_local_base_freq,
            "is the rotary base of the sliding-window layers, and model.sliding_window is null (no layer slides)",
            f"copy sliding_window from the model's config.json, {off}",
        )
        for other, name in (
            (self.long_rope, "rope_short_factor"),
            (self.rope_yarn_factor is not None, "rope_yarn_factor"),
            (self.rope_scaling, "rope_scaling"),
        ):
            require(
                not other,
                "model.rope_local_base_freq",
                self.rope_local_base_freq,
                f"gives the sliding-window layers their own RoPE, which steerlm combines with linear scaling alone, "
                f"and model.{name} sets another scaling",
                f"unset model.{name}, {off}",
            )
        require(
            self.position_embedding_type == PositionEmbedding.rope,
            "model.position_embedding_type",
            self.position_embedding_type.value,
            "must be rope with model.rope_local_base_freq",
            f"set model.position_embedding_type=rope, {off}",
        )

    def _validate_long_rope(self) -> None:
        pairs = int(self.rotary_percent * self.head_dim) // 2
        for name in ("rope_short_factor", "rope_long_factor"):
            factors = getattr(self, name)
            require(
                factors is not None and len(factors) == pairs and all(factor > 0 for factor in factors),
                f"model.{name}",
                factors,
                f"LongRoPE needs {pairs} positive factors here, one per rotary channel pair (model.kv_channels x "
                "model.rotary_percent / 2), in both rope_short_factor and rope_long_factor",
                "copy both lists from the model's config.json (rope_scaling), or set both to null for plain RoPE",
            )
        self._validate_scaling("LongRoPE's factors", "set both factor lists to null")

    def _validate_yarn(self) -> None:
        require(
            not self.long_rope,
            "model.rope_yarn_factor",
            self.rope_yarn_factor,
            "is YaRN's scaling, and LongRoPE's factors (model.rope_short_factor) are set too",
            "set model.rope_yarn_factor=null or both LongRoPE factor lists to null",
        )
        require_positive("model", self, ("rope_yarn_factor", "rope_yarn_beta_fast", "rope_yarn_beta_slow"))
        self._validate_scaling("YaRN", "set model.rope_yarn_factor=null")

    def _validate_linear(self) -> None:
        others = ((self.long_rope, "rope_short_factor"), (self.rope_yarn_factor is not None, "rope_yarn_factor"))
        for other, name in others:
            require(
                not other,
                "model.rope_linear_factor",
                self.rope_linear_factor,
                f"is linear RoPE scaling, and model.{name} sets another scaling too",
                f"set model.rope_linear_factor=null or model.{name}=null",
            )
        require(
            self.rope_attention_factor == 1.0,
            "model.rope_attention_factor",
            self.rope_attention_factor,
            "must be 1.0 with linear RoPE scaling (neither transformers' `linear` nor NeMo's "
            "seq_len_interpolation_factor scales cos and sin)",
            "set model.rope_attention_factor=1.0",
        )
        require_positive("model", self, ("rope_linear_factor",))
        self._validate_scaling("linear scaling", "set model.rope_linear_factor=null")

    def _validate_scaling(self, scaling: str, off: str) -> None:
        """What LongRoPE, YaRN and linear scaling share: RoPE, no Llama-3.1 scaling besides, a pretraining length,
        a factor."""
        require(
            not self.rope_scaling,
            "model.rope_scaling",
            self.rope_scaling,
            f"is Llama-3.1's frequency scaling, which {scaling} replaces",
            "set model.rope_scaling=false",
        )
        require(
            self.position_embedding_type == PositionEmbedding.rope,
            "model.position_embedding_type",
            self.position_embedding_type.value,
            f"must be rope for {scaling}",
            f"set model.position_embedding_type=rope, or {off.removeprefix('set ')}",
        )
        require_positive("model", self, ("rope_original_max_positions", "rope_attention_factor"))


# Model fields that change tensor shapes or their meaning: a checkpoint (steerlm's, `steerlm.checkpoint.sharded`, or a
# NeMo archive's, `steerlm.models.nemo_config`) loads only into a model that has the same values. A field added after
# checkpoints were written has the value they were written with in `MODEL_FIELDS_ADDED` (read where a meta lacks it).
MODEL_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "normalization",
    "layernorm_zero_centered_gamma",
    "activation",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "apply_embedding_scaling",
    "post_sublayer_norms",
)
MODEL_FIELDS_ADDED = {
    "apply_embedding_scaling": False,
    "post_sublayer_norms": False,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "query_pre_attn_scalar": None,
    "sliding_window": None,
    "window_attn_skip_freq": None,
    "rope_local_base_freq": None,
    "layernorm_zero_centered_gamma": False,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "rope_short_factor": None,
    "rope_long_factor": None,
    "rope_yarn_factor": None,
    "rope_yarn_beta_fast": 32.0,
    "rope_yarn_beta_slow": 1.0,
    "rope_yarn_truncate": True,
    "rope_linear_factor": None,
    "rope_original_max_positions": 4096,
    "rope_attention_factor": 1.0,
}
# LongRoPE's, YaRN's and linear scaling's fields (`ModelConfig.rope_short_factor` …), sliding windows, Gemma 3's
# local RoPE and Gemma 2's soft-capping and attention scale: no tensor shape shows them, but a run started from weights
# trained with them computes another function without them, so `init_from` a steerlm checkpoint checks them.
FUNCTION_FIELDS = (
    "sliding_window",
    "window_attn_skip_freq",
    "rope_local_base_freq",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_short_factor",
    "rope_long_factor",
    "rope_yarn_factor",
    "rope_yarn_beta_fast",
    "rope_yarn_beta_slow",
    "rope_yarn_truncate",
    "rope_linear_factor",
    "rope_original_max_positions",
    "rope_attention_factor",
)


def written_model_field(written: Mapping[str, Any], name: str) -> Any:
    """A model field as a checkpoint's meta records it; a field the meta predates has the value it then had."""
    return written.get(name, MODEL_FIELDS_ADDED.get(name))
