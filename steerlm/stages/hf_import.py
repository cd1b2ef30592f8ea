"""A Hugging Face Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3, Gemma, Gemma 2 or Gemma 3 directory → a steerlm
checkpoint at any TP/PP (`recipes/convert.py to=steerlm`).

Collective over the layout the checkpoint is written from. A `…ForCausalLM` (LlamaForCausalLM, NemotronForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Phi3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM,
Gemma3ForCausalLM) becomes a language model, a `…ForSequenceClassification` a regression APM (`score` is its head); a
Gemma3ForConditionalGeneration's language model becomes one too (its vision tower is left out, and the log says so).
An export of steerlm's own carries `steerlm/` (the source config, the word vocabulary, the APM head's bias in
config.json and its unused vocabulary output layer), so export → import gives the same config and bitwise the same
weights; another tool's model gets a config synthesised from config.json (an APM's schema from `id2label` and
`apm_range`).

Each rank builds its shards and fills them from the safetensors files one full tensor at a time
(`MegatronFromHF` reads lazily), then the checkpoint is saved weights-only: runs start from it with
`init_from`, and chat, serve, annotate and evaluate read it like any other.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, save_checkpoint
from steerlm.config import AttributeModelConfig, ConfigError, ModelConfig, PrecisionConfig, TrainConfig
from steerlm.config.convert import ConvertConfig
from steerlm.config.pretrain import PretrainConfig, TextDataConfig
from steerlm.config.schema import APMConfig, AttributesConfig, DType, TokenizerConfig, TokenizerType, TrainDataConfig
from steerlm.config.validation import validate_model_layout
from steerlm.data.attribute_lines import ATTRIBUTE_LINES_FILE
from steerlm.models.attribute import build_checkpoint_model
from steerlm.models.hf_config import check_hf_config, hf_model_fields, unmodelled_window
from steerlm.models.hf_llama import (
    HEAD_BIAS,
    HF_ARCHITECTURES,
    LLAMA,
    MegatronFromHF,
    SafetensorsWeights,
    read_hf_config,
)
from steerlm.models.sharding import load_full_parameters, named_global_parameters
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_source import (
    EXPORT_DIR,
    EXPORT_FILE,
    EXTRA_WEIGHTS,
    SCORE_BIAS,
    SOURCE_CONFIG,
    ModelKind,
    saved_train_config,
)
from steerlm.tokenizers import VOCAB_FILE

log = logging.getLogger(__name__)
ARCHITECTURES = tuple(name for f in HF_ARCHITECTURES.values() for name in (f.causal_lm, f.sequence_classifier))
CLASSIFIERS = tuple(family.sequence_classifier for family in HF_ARCHITECTURES.values())
TOKENIZER_DIR = "tokenizer"
# The files of a Hugging Face tokenizer that an import copies next to the checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_DTYPES = {"float32": DType.fp32, "bfloat16": DType.bf16, "float16": DType.fp16}


@dataclass(frozen=True)
class ImportPlan:
    config: TrainConfig  # what the checkpoint's config.yaml will say (model, tokenizer, schema, …)
    num_attributes: int | None  # a regression APM's head size
    step: int
    extras: dict[str, torch.Tensor]  # megatron tensors that are not HF tensors (an APM head's bias)
    tokenizer_source: Path | None  # the directory an import copies the tokenizer from
    weights: tuple[Path, ...]  # the directories whose *.safetensors hold the HF tensors


def _architecture(hf: dict, location: str) -> str:
    architecture = (hf.get("architectures") or [LLAMA.causal_lm])[0]
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            "input",
            location,
            f"config.json names the architecture {architecture!r}",
            f"convert a {', a '.join(ARCHITECTURES[:-1])} or a {ARCHITECTURES[-1]}",
        )
    family = HF_ARCHITECTURES.get(hf.get("model_type", LLAMA.model_type))
    if family is not None and architecture not in (family.causal_lm, family.sequence_classifier):
        raise ConfigError(
            "input",
            location,
            f"config.json names the architecture {architecture!r} for model_type {family.model_type!r}",
            f"set architectures to [{family.causal_lm!r}] or [{family.sequence_classifier!r}], as its model_type says",
        )
    return architecture


def _synthesised_model(hf: dict, location: str) -> ModelConfig:
    """`model.*` of another tool's model: the fields config.json determines, defaults left as defaults. A model whose
    sliding-window layers steerlm does not model (Qwen2's last layers) gets the window's positions: within them
    steerlm's full attention computes what its window does."""
    fields = hf_model_fields(hf, "input", location)
    if fields["num_query_groups"] == fields["num_attention_heads"]:
        fields["num_query_groups"] = None
    if fields["kv_channels"] == fields["hidden_size"] // fields["num_attention_heads"]:
        fields["kv_channels"] = None
    name = Path(location).resolve().name
    positions = min(hf["max_position_embeddings"], unmodelled_window(hf) or hf["max_position_embeddings"])
    return ModelConfig(name=name, max_position_embeddings=positions, **fields)


def _dtype(hf: dict, weights: SafetensorsWeights) -> DType:
    named = hf.get("torch_dtype") or hf.get("dtype")
    if named in _DTYPES:
        return _DTYPES[named]
    first = next(iter(weights), None)
    kind = {torch.float32: DType.fp32, torch.bfloat16: DType.bf16, torch.float16: DType.fp16}
    return kind.get(weights[first].dtype, DType.fp32) if first is not None else DType.fp32


def _hf_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def _check_vocabulary(directory: Path, vocab_size: int, location: str) -> None:
    """A tokenizer with more ids than the model has rows would index past the embedding."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as TokenizerFile

        size = TokenizerFile.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    else:
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    if size > vocab_size:
        raise ConfigError(
            "input",
            location,
            f"its tokenizer has {size} token ids but config.json's vocab_size is {vocab_size}",
            "convert a directory whose tokenizer and model belong together",
        )


def _typed_saved(directory: Path) -> TrainConfig:
    """The config the exported checkpoint was trained with, as its recipe's dataclass."""
    saved = OmegaConf.load(directory / EXPORT_DIR / SOURCE_CONFIG)
    if not isinstance(saved, DictConfig):
        raise ConfigError("input", str(directory), f"{EXPORT_DIR}/{SOURCE_CONFIG} is not a config", "re-export it")
    return saved_train_config(saved)


def _steerlm_export(cfg: ConvertConfig, directory: Path, hf: dict, output: Path) -> ImportPlan:
    """An export of steerlm's: its own config back, the model checked against config.json."""
    config = _typed_saved(directory)
    check_hf_config(hf, config.model, "input", cfg.input)
    export = json.loads((directory / EXPORT_DIR / EXPORT_FILE).read_text())
    extras: dict[str, torch.Tensor] = {}
    num_attributes = None
    if export["kind"] == ModelKind.regression_apm.value:
        bias = torch.tensor(hf[SCORE_BIAS], dtype=torch.float32)
        num_attributes = int(bias.numel())
        extras[HEAD_BIAS] = bias
    weights = (
        (directory, directory / EXPORT_DIR) if (directory / EXPORT_DIR / EXTRA_WEIGHTS).is_file() else (directory,)
    )
    tokenizer = None
    if export.get("tokenizer") == TokenizerType.word.value:
        tokenizer = directory / EXPORT_DIR
    elif export.get("tokenizer") == TokenizerType.hf.value:
        tokenizer = directory
    changes: dict[str, Any] = {"output_dir": str(output)}
    if tokenizer is not None and hasattr(config, "tokenizer"):
        changes["tokenizer"] = TokenizerConfig(TokenizerType(export["tokenizer"]), str(output / TOKENIZER_DIR))
    config = replace(config, **changes)
    return ImportPlan(config, num_attributes, int(export["step"]), extras, tokenizer, weights)


def _other_tool(cfg: ConvertConfig, directory: Path, hf: dict, output: Path, architecture: str) -> ImportPlan:
    """Another tool's model: a config synthesised from config.json (and `apm_range` for a reward model)."""
    model = _synthesised_model(hf, cfg.input)
    weights = SafetensorsWeights(directory)
    precision = PrecisionConfig(dtype=_dtype(hf, weights))
    has_tokenizer = _hf_tokenizer_files(directory)
    tokenizer = TokenizerConfig(TokenizerType.hf, str(output / TOKENIZER_DIR))
    placeholder = f"(imported from {directory}; not trained by steerlm)"
    common: dict[str, Any] = {"model": model, "precision": precision, "output_dir": str(output)}
    if architecture in CLASSIFIERS:
        labels = [hf.get("id2label", {}).get(str(i), f"score_{i}") for i in range(int(hf.get("num_labels", 1)))]
        if cfg.apm_range is None:
            raise ConfigError(
                "apm_range",
                None,
                f"{cfg.input} is a reward model of another tool ({', '.join(labels)}); steerlm needs its scores' range",
                "set apm_range=[min,max], e.g. apm_range=[0,4] for HelpSteer-style attributes",
            )
        if not has_tokenizer:
            raise ConfigError("input", cfg.input, "has no tokenizer files", "convert a directory with its tokenizer")
        low, high = cfg.apm_range
        attributes = AttributesConfig(directory.resolve().name, labels, low, high, integer=False)
        config: TrainConfig = AttributeModelConfig(
            **common,
            attributes=attributes,
            tokenizer=tokenizer,
            data=TrainDataConfig(train_file=placeholder),
            apm=APMConfig(),
        )
        bias = torch.zeros(len(labels))
        return ImportPlan(config, len(labels), 0, {HEAD_BIAS: bias}, directory, (directory,))
    if has_tokenizer:
        config = PretrainConfig(**common, tokenizer=tokenizer, data=TextDataConfig(train_file=placeholder))
        return ImportPlan(config, None, 0, {}, directory, (directory,))
    log.info("%s has no tokenizer files: the checkpoint's config names none", cfg.input)
    return ImportPlan(TrainConfig(**common), None, 0, {}, None, (directory,))


def plan_import(cfg: ConvertConfig) -> ImportPlan:
    """What the import of `cfg.input` writes, read from its files (no weights but an export's extras)."""
    directory, output = Path(cfg.input), Path(cfg.output).resolve()
    hf = read_hf_config(directory)
    architecture = _architecture(hf, cfg.input)
    if (directory / EXPORT_DIR / EXPORT_FILE).is_file():
        plan = _steerlm_export(cfg, directory, hf, output)
    else:
        plan = _other_tool(cfg, directory, hf, output, architecture)
    if (plan.num_attributes is not None) != (architecture in CLASSIFIERS):
        raise ConfigError(
            "input",
            cfg.input,
            f"config.json's architecture {architecture} disagrees with {EXPORT_DIR}/{EXPORT_FILE}",
            "re-export the model with recipes/convert.py",
        )
    if _hf_tokenizer_files(directory):
        _check_vocabulary(directory, hf["vocab_size"], cfg.input)
    return plan


def copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in (VOCAB_FILE, *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def import_to_steerlm(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write a weights-only steerlm checkpoint of the HF directory `cfg.input` into `cfg.output`."""
    plan = plan_import(cfg)
    model = plan.config.model
    validate_model_layout(model, cfg.parallel, runtime.detect_accelerator())
    precision = plan.config.precision
    chunks = build_checkpoint_model(model, precision, layout, cfg.seed, plan.num_attributes)
    names = [name for name, _ in named_global_parameters(chunks)]
    weights = SafetensorsWeights(*plan.weights)
    if weights.left_out and layout.is_rank_zero:  # a multimodal Gemma 3's vision tower and projector
        log.info(
            "%s: its language model alone is converted; left out: %d tensors, e.g. %s",
            cfg.input,
            len(weights.left_out),
            ", ".join(weights.left_out[:3]),
        )
    from_hf = MegatronFromHF(weights, model, [n for n in names if n not in plan.extras])
    try:
        load_full_parameters(chunks, from_hf, layout.tp_rank, layout.tp, keep=lambda name: name in plan.extras)
        load_full_parameters(chunks, plan.extras, layout.tp_rank, layout.tp, keep=lambda name: name not in plan.extras)
    except (KeyError, ValueError) as error:
        message = str(error.args[0]) if error.args else str(error)
        raise ConfigError("input", cfg.input, message, "convert a complete checkpoint of this shape") from None
    output = Path(plan.config.output_dir)
    if layout.is_rank_zero and plan.tokenizer_source is not None:
        copy_tokenizer(plan.tokenizer_source, output / TOKENIZER_DIR)
    save_checkpoint(output, plan.step, WeightsOnly(chunks), layout, plan.config)
    lines = Path(cfg.input) / EXPORT_DIR / ATTRIBUTE_LINES_FILE  # a steerable export's trained attribute lines
    if layout.is_rank_zero and lines.is_file():
        shutil.copyfile(lines, output / ATTRIBUTE_LINES_FILE)
    if layout.is_rank_zero:
        log.info("imported %s into %s (step %d, %s)", cfg.input, output, plan.step, layout.describe())
    return output
