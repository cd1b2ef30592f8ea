"""A NeMo 1.x Megatron-GPT `model_config.yaml` → steerlm's `ModelConfig` (and the NeMo-Aligner reward head).

Keys are read with the defaults NeMo's MegatronGPTModel applies when a key is absent (`bias` true,
`share_embeddings_and_output_weights` true, `normalization` layernorm, ...), so an old archive's missing key
means what it meant to NeMo. Anything steerlm's Llama-family model cannot compute the same way is refused,
naming the key and its value, instead of being imported into a model that would give other logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from steerlm.config.schema import MODEL_SHAPE_FIELDS, Activation, ModelConfig, Normalization, PositionEmbedding
from steerlm.errors import ConfigError, DataError

_NORMALIZATION = {
    "rmsnorm": Normalization.RMSNorm,
    "layernorm": Normalization.LayerNorm,
    "layernorm1p": Normalization.LayerNorm,  # with zero-centred weights: `layernorm_zero_centered_gamma`
}
_ZERO_CENTRED = "layernorm1p"
_ACTIVATION = {
    "swiglu": Activation.swiglu,
    "fast-swiglu": Activation.swiglu,
    "gelu": Activation.gelu,
    "squared-relu": Activation.squared_relu,
}
_POSITION = {"rope": PositionEmbedding.rope, "learned_absolute": PositionEmbedding.learned_absolute}
# NeMo's Llama-3.1 RoPE scaling (`scale_positional_embedding`): steerlm's (megatron's) fixes all but the factor.
_ROPE_SCALING_FIXED = {"low_freq_factor": 1, "high_freq_factor": 4, "old_context_len": 8192}
# Keys whose non-default value changes the computation in a way steerlm's model does not have.
_MUST_BE_OFF: dict[str, tuple[Any, str]] = {
    "rotary_interleaved": (False, "interleaved RoPE pairs"),
    "apply_embedding_scaling": (False, "scaled input embeddings"),
    "qk_layernorm": (False, "query/key layer norms"),
    "num_moe_experts": (None, "mixture-of-experts layers"),
    "multi_latent_attention": (False, "multi-latent attention"),
    "window_size": (None, "sliding-window attention"),
    "fp8_params": (False, "fp8 weights"),
    "output_sequence": (False, "a per-token critic head"),
    "use_avg_pool": (False, "a reward head over the mean hidden state (steerlm scores the last token)"),
    "account_for_embedding_in_pipeline_split": (False, "pipeline stages that count the embedding as a layer"),
    "account_for_loss_in_pipeline_split": (False, "pipeline stages that count the loss as a layer"),
}


@dataclass(frozen=True)
class RewardHead:
    """A NeMo-Aligner regression reward model's `rm_head`: one output per attribute, read at the last token."""

    num_attributes: int
    merge_weights: list[float] | None  # NeMo-Aligner's merged reward (`regression.attribute_weights`)


@dataclass(frozen=True)
class NemoModel:
    """What `model_config.yaml` (with the embedding's row count from the weights) says about the model."""

    model: ModelConfig
    reward_head: RewardHead | None  # a NeMo-Aligner regression reward model's head; None: a language model


class _Reader:
    """Typed access to the config's keys; every refusal names `<archive>/model_config.yaml`, the key and value."""

    def __init__(self, config: Mapping[str, Any], source: str) -> None:
        self.config, self.source = config, source

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key, default)
        return default if value is None and default is not None else value

    def required(self, key: str, kind: Callable[[Any], Any] = int) -> Any:
        if self.config.get(key) is None:
            self.refuse(key, None, "is missing", f"a NeMo Megatron-GPT model_config.yaml sets {key}")
        return self.number(key, self.config[key], kind)

    def number(self, key: str, value: Any, kind: Callable[[Any], Any]) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            self.refuse(key, value, f"is not a {kind.__name__}", "check the archive's model_config.yaml")
        if kind is int and isinstance(value, float) and value != number:
            self.refuse(key, value, "is not an integer", "check the archive's model_config.yaml")
        return number

    def choice(self, key: str, default: str, table: Mapping[str, Any], what: str) -> Any:
        value = str(self.get(key, default)).lower()
        if value not in table:
            self.refuse(
                key, value, f"steerlm's model has no {what} of that kind", f"steerlm supports {', '.join(table)}"
            )
        return table[value]

    def refuse(self, key: str, value: Any, problem: str, fix: str = "") -> None:
        raise DataError(self.source, None, key, f"{value!r} {problem}", fix)


def nemo_model(config: Mapping[str, Any], source: str, embedding_rows: int, name: str = "nemo") -> NemoModel:
    """The model `config` (model_config.yaml's `model` section) describes; DataError naming any key steerlm
    cannot represent.

    `embedding_rows` (the word embedding's rows in the weights: NeMo's padded vocabulary) becomes
    `vocab_size`, so every row of the archive is kept and no layout-dependent padding is redone.
    """
    keys = _Reader(config, source)
    if keys.get("mcore_gpt") is not True:
        keys.refuse(
            "mcore_gpt",
            keys.get("mcore_gpt"),
            "is not true: the archive holds NeMo's legacy (non megatron-core) GPT, whose tensors steerlm does not read",
            "convert it with NeMo's scripts/checkpoint_converters/convert_nemo_gpt_to_mcore.py first",
        )
    for key, (default, what) in _MUST_BE_OFF.items():
        if keys.get(key, default) not in (default, None, False):
            keys.refuse(key, keys.get(key), f"switches on {what}, which steerlm's model does not have")
    customisation = keys.get("mcore_customization_config") or {}
    if any(value not in (0, None, False) for value in customisation.values()):
        keys.refuse("mcore_customization_config", customisation, "changes megatron's GPTModel in ways steerlm lacks")
    zero_centered = _zero_centered(keys)
    if keys.get("openai_gelu", False):
        keys.refuse("openai_gelu", True, "(tanh-approximated GELU) is not steerlm's exact GELU")
    add_bias = bool(keys.get("bias", True))
    qkv_bias = bool(keys.get("qkv_bias", False)) and not add_bias  # Qwen2's; `bias` puts biases there too
    heads = keys.required("num_attention_heads")
    groups = keys.get("num_query_groups")
    model = ModelConfig(
        name=name,
        num_layers=keys.required("num_layers"),
        hidden_size=keys.required("hidden_size"),
        ffn_hidden_size=keys.required("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=None if groups in (None, heads) else keys.number("num_query_groups", groups, int),
        kv_channels=None
        if keys.get("kv_channels") is None
        else keys.number("kv_channels", keys.get("kv_channels"), int),
        vocab_size=embedding_rows,
        make_vocab_size_divisible_by=_vocab_multiple(keys, embedding_rows),
        max_position_embeddings=keys.number(
            "encoder_seq_length", keys.get("encoder_seq_length", keys.get("max_position_embeddings", 512)), int
        ),
        normalization=keys.choice("normalization", "layernorm", _NORMALIZATION, "normalization"),
        layernorm_zero_centered_gamma=zero_centered,
        layernorm_epsilon=keys.number("layernorm_epsilon", keys.get("layernorm_epsilon", 1e-5), float),
        activation=keys.choice("activation", "gelu", _ACTIVATION, "activation"),
        position_embedding_type=keys.choice(
            "position_embedding_type", "learned_absolute", _POSITION, "position embedding"
        ),
        rotary_base=_rotary_base(keys),
        rotary_percent=keys.number("rotary_percentage", keys.get("rotary_percentage", 1.0), float),
        **_rope_scaling(keys),
        share_embeddings_and_output_weights=_tied(keys),
        add_bias_linear=add_bias,
        add_qkv_bias=qkv_bias,
        init_method_std=keys.number("init_method_std", keys.get("init_method_std", 0.02), float),
        hidden_dropout=keys.number("hidden_dropout", keys.get("hidden_dropout", 0.1), float),
        attention_dropout=keys.number("attention_dropout", keys.get("attention_dropout", 0.1), float),
    )
    try:
        model.validate()
    except ValueError as error:
        raise DataError(source, None, None, f"describes a model steerlm refuses: {error}") from None
    return NemoModel(model=model, reward_head=_reward_head(keys))


def layers_per_stage(config: Mapping[str, Any], source: str, pipeline_parallel: int) -> tuple[int, ...]:
    """How NeMo split the decoder layers over `pipeline_parallel` stages: evenly, after the optional
    `num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage`."""
    keys = _Reader(config, source)
    total = keys.required("num_layers")
    first, last = config.get("num_layers_in_first_pipeline_stage"), config.get("num_layers_in_last_pipeline_stage")
    if pipeline_parallel == 1:
        return (total,)
    middle = pipeline_parallel - (first is not None) - (last is not None)
    rest = total - (first or 0) - (last or 0)
    if middle < 0 or (middle == 0 and rest != 0) or (middle > 0 and rest % middle):
        keys.refuse("num_layers", total, f"cannot be split over {pipeline_parallel} pipeline stages as configured")
    even = [rest // middle] * middle if middle else []
    return tuple(([first] if first is not None else []) + even + ([last] if last is not None else []))


def _zero_centered(keys: _Reader) -> bool:
    """NeMo 1.x's MegatronGPTModel centres its norm weights on zero for `normalization: layernorm1p` (Nemotron) and
    only then: its transformer config overrides a `layernorm_zero_centered_gamma` key with that rule, while NeMo's
    exporters read the key. An archive where the two disagree is refused rather than read one way."""
    centred = str(keys.get("normalization", "layernorm")).lower() == _ZERO_CENTRED
    key = keys.get("layernorm_zero_centered_gamma")
    if key is not None and bool(key) != centred:
        keys.refuse(
            "layernorm_zero_centered_gamma",
            key,
            f"disagrees with normalization={keys.get('normalization', 'layernorm')!r}: NeMo's model centres the "
            "norm weights for layernorm1p alone, its exporters follow this key",
            "check which norm the model was trained with; layernorm1p means zero-centred LayerNorm weights",
        )
    return centred


def _vocab_multiple(keys: _Reader, rows: int) -> int:
    """NeMo's `make_vocab_size_divisible_by` when it divides the rows (so steerlm pads nothing), else 1."""
    multiple = keys.number("make_vocab_size_divisible_by", keys.get("make_vocab_size_divisible_by", 128), int)
    return multiple if rows % multiple == 0 else 1


def _rotary_base(keys: _Reader) -> int:
    base = keys.number("rotary_base", keys.get("rotary_base", 10000), float)
    if not base.is_integer():
        keys.refuse("rotary_base", base, "is not a whole number; steerlm's model.rotary_base is an integer")
    return int(base)


def _rope_scaling(keys: _Reader) -> dict:
    """Llama-3.1's scaling (`scale_positional_embedding`) and position interpolation (`seq_len_interpolation_factor`,
    steerlm's `model.rope_linear_factor`; both at once is refused by the model's validation)."""
    key = "seq_len_interpolation_factor"
    fields = {} if keys.get(key) is None else {"rope_linear_factor": keys.number(key, keys.get(key), float)}
    if not keys.get("scale_positional_embedding", False):
        return {"rope_scaling": False, **fields}
    for key, value in _ROPE_SCALING_FIXED.items():
        if not math.isclose(keys.number(key, keys.get(key, value), float), value):
            keys.refuse(key, keys.get(key), f"differs from Llama-3.1's RoPE scaling ({value}), the one steerlm has")
    return {
        "rope_scaling": True,
        "rope_scaling_factor": keys.number("scale_factor", keys.get("scale_factor", 8), float),
        **fields,
    }


def _tied(keys: _Reader) -> bool:
    """NeMo ties by default; NeMo-Aligner's reward models never do (it overrides the key to false)."""
    if _is_reward_model(keys):
        return False
    return bool(keys.get("share_embeddings_and_output_weights", True))


def _is_reward_model(keys: _Reader) -> bool:
    return keys.get("reward_model_type") is not None or "RewardModel" in str(keys.get("target", ""))


def _reward_head(keys: _Reader) -> RewardHead | None:
    if not _is_reward_model(keys):
        return None
    kind = keys.get("reward_model_type", "binary_ranking")
    if kind != "regression":
        keys.refuse(
            "reward_model_type",
            kind,
            "is not a regression reward model; steerlm's attribute model regresses one score per attribute",
            "import a model trained with model.reward_model_type=regression",
        )
    regression = keys.get("regression") or {}
    count = keys.number("regression.num_attributes", regression.get("num_attributes", 1), int)
    weights = regression.get("attribute_weights")
    if weights is None and regression.get("merge_attributes", False):
        weights = [1.0 / count] * count  # NeMo-Aligner's RewardModelHead: a uniform average by default
    return RewardHead(count, None if weights is None else [float(w) for w in weights])


# Fields a run's model must share with the archive's (besides the padded vocabulary, compared as rows).
_SAME_FIELDS = (
    *MODEL_SHAPE_FIELDS,
    "layernorm_epsilon",
    "rotary_base",
    "rotary_percent",
    "rope_scaling",
    "rope_short_factor",  # null in every NeMo model: a LongRoPE run cannot start from one
    "rope_yarn_factor",  # nor a YaRN run
    "rope_linear_factor",
    "sliding_window",  # NeMo's window_size is refused on import: every layer attends to every position
    "window_attn_skip_freq",
    "rope_local_base_freq",  # nor a Gemma 3 (its windows need one)
    "attn_logit_softcapping",  # null in every NeMo 1.x model: nor a Gemma 2
    "final_logit_softcapping",
    "query_pre_attn_scalar",
)


def check_nemo_model(theirs: ModelConfig, ours: ModelConfig, key: str, location: str) -> None:
    """Refuse a run whose `model.*` differs from the archive's model, naming the field and the value to set."""

    def value(model: ModelConfig, name: str) -> Any:
        found = {"num_query_groups": model.query_groups, "kv_channels": model.head_dim}.get(name, getattr(model, name))
        return found.value if hasattr(found, "value") else found

    names = list(_SAME_FIELDS)
    if theirs.rope_scaling:
        names.append("rope_scaling_factor")
    if theirs.position_embedding_type == PositionEmbedding.learned_absolute:
        names.append("max_position_embeddings")
    for name in names:
        if value(ours, name) != value(theirs, name):
            raise ConfigError(
                f"model.{name}",
                value(ours, name),
                f"{key}={location} holds a NeMo model with {name}={value(theirs, name)!r} (model_config.yaml)",
                f"set model.{name}={value(theirs, name)!r}",
            )
    if ours.padded_vocab_size != theirs.padded_vocab_size:
        raise ConfigError(
            "model.vocab_size",
            ours.vocab_size,
            f"{key}={location} holds a NeMo model whose vocabulary has {theirs.padded_vocab_size} rows "
            f"(NeMo's padding); this run's model.vocab_size pads to {ours.padded_vocab_size}",
            f"set model.vocab_size={theirs.vocab_size} model.make_vocab_size_divisible_by="
            f"{theirs.make_vocab_size_divisible_by}",
        )


# ---- the other way: steerlm's model as a NeMo model_config.yaml (`recipes/convert.py to=nemo`) ----

GPT_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
REWARD_MODEL_TARGET = (
    "nemo_aligner.models.nlp.gpt.megatron_gpt_regression_reward_model.MegatronGPTRegressionRewardModel"
)
_PRECISION = {"fp32": 32, "bf16": "bf16", "fp16": 16}


def nemo_vocab_multiple(rows: int, tokens: int, tensor_parallel: int, preferred: int) -> int | None:
    """The `make_vocab_size_divisible_by` with which NeMo pads a tokenizer of `tokens` ids at TP `tensor_parallel`
    to exactly `rows` (NeMo rounds `tokens` up to a multiple of it × the TP size), trying `preferred` first, then
    powers of two from the largest; None when none does (then `override_vocab_size` fixes the rows)."""
    candidates = [preferred, *(2**power for power in range(rows.bit_length(), -1, -1))]
    for multiple in candidates:
        step = multiple * tensor_parallel
        if multiple > 0 and rows % step == 0 and rows - step < tokens <= rows:
            return multiple
    return None


def _nemo_normalization(model: ModelConfig) -> str:
    """NeMo 1.x's name of `model`'s norm; it has zero-centred weights for LayerNorm alone (`layernorm1p`)."""
    if not model.layernorm_zero_centered_gamma:
        return {Normalization.RMSNorm: "rmsnorm", Normalization.LayerNorm: "layernorm"}[model.normalization]
    if model.normalization != Normalization.LayerNorm:
        raise ValueError(
            "NeMo 1.x has no RMSNorm with zero-centred weights (model.layernorm_zero_centered_gamma=true with "
            "RMSNorm): its MegatronGPTModel centres LayerNorm's alone (normalization: layernorm1p)"
        )
    return _ZERO_CENTRED


def nemo_model_config(
    model: ModelConfig,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    dtype: str,
    tokenizer: dict,
    tokenizer_ids: int,
    reward_head: RewardHead | None = None,
) -> dict:
    """`model_config.yaml` of a NeMo Megatron-GPT model (megatron-core, Transformer Engine's layer spec) computing
    what `model` computes: every key whose NeMo default differs from a Llama's is written (NeMo's defaults are
    GPT-2's), the parallel sizes are the export's, and the vocabulary is NeMo's padding of `tokenizer_ids` to
    exactly the model's rows. `reward_head`: a NeMo-Aligner regression reward model (its head read at the last
    token, one output per attribute), whose embeddings are never tied."""
    rows = model.padded_vocab_size
    multiple = nemo_vocab_multiple(rows, tokenizer_ids, tensor_parallel, model.make_vocab_size_divisible_by)
    activation = {value: key for key, value in _ACTIVATION.items() if key != "swiglu"}[model.activation]
    config: dict[str, Any] = {
        "target": REWARD_MODEL_TARGET if reward_head is not None else GPT_TARGET,
        "mcore_gpt": True,
        "transformer_engine": True,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.query_groups,
        "kv_channels": model.kv_channels,
        "encoder_seq_length": model.max_position_embeddings,
        "max_position_embeddings": model.max_position_embeddings,
        "position_embedding_type": {v: k for k, v in _POSITION.items()}[model.position_embedding_type],
        "rotary_base": model.rotary_base,
        "rotary_percentage": model.rotary_percent,
        "normalization": _nemo_normalization(model),
        "layernorm_epsilon": model.layernorm_epsilon,
        "activation": activation,
        "bias": model.add_bias_linear,
        "qkv_bias": model.add_qkv_bias,
        "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights and reward_head is None,
        "make_vocab_size_divisible_by": multiple or model.make_vocab_size_divisible_by,
        "init_method_std": model.init_method_std,
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
        "ffn_dropout": 0.0,
        "apply_query_key_layer_scaling": False,
        "rotary_interleaved": False,
        "apply_rope_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": True,
        "persist_layer_norm": True,
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": pipeline_parallel,
        "virtual_pipeline_model_parallel_size": None,
        "sequence_parallel": False,
        "precision": _PRECISION[dtype],
        "megatron_amp_O2": False,
        "fp8": False,
        "micro_batch_size": 1,
        "global_batch_size": 8,
        "seed": 1234,
        "dist_ckpt_format": "torch_dist",
        "tokenizer": tokenizer,
        "optim": {"name": "fused_adam", "lr": 1.0e-5},
        "data": {},
    }
    if multiple is None:
        config["override_vocab_size"] = rows
    if model.rope_linear_factor is not None:
        config["seq_len_interpolation_factor"] = model.rope_linear_factor
    if model.rope_scaling:
        config.update(scale_positional_embedding=True, scale_factor=model.rope_scaling_factor, **_ROPE_SCALING_FIXED)
    if reward_head is not None:
        weights = reward_head.merge_weights
        config.update(
            reward_model_type="regression",
            regression={
                "num_attributes": reward_head.num_attributes,
                "merge_attributes": False,  # every attribute's score, as SteerLM's annotation reads them
                "attribute_weights": weights,
                "loss_mask_val": -100,
                "loss_func": "regression",
                "load_rm_head_weights": False,
            },
            output_sequence=False,
            use_avg_pool=False,
            force_head_dtype="float32",
            reward_standardization={"enable": False, "mean": None, "std": None},
        )
    return config
