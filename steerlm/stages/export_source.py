"""What a steerlm checkpoint is, for an export: its kind, shape, dtype, tokenizer, schema and template, read
from the config saved with it (no weights), and the names of the files an export holds."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig

from steerlm.checkpoint.sharded import read_meta, resolve_checkpoint, saved_config
from steerlm.config import AttributeModelConfig, ConfigError, ModelConfig, PrecisionConfig, TrainConfig, to_typed
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.config.pretrain import PretrainConfig
from steerlm.config.schema import APMType, AttributesConfig, DType, TokenizerConfig, TokenizerType
from steerlm.config.sft import SFTConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.template import SteerLMTemplate
from steerlm.inference.loading import read_checkpoint_setup
from steerlm.models.hf_llama import HFArchitecture, hf_architecture
from steerlm.tokenizers import VOCAB_FILE

EXPORT_DIR = "steerlm"  # steerlm's own files in an export; no Hugging Face tool reads a subdirectory
EXPORT_FILE = "export.json"
SOURCE_CONFIG = "config.yaml"
EXTRA_WEIGHTS = "extra.safetensors"  # under EXPORT_DIR: what HF models do not read
SCORE_BIAS = "steerlm_score_bias"
EXPORT_FORMAT = 1
GENERATION_CONFIG = "generation_config.json"


class ModelKind(str, Enum):
    language_model = "language_model"  # pretraining or the demo: no attributes, no template
    steerable = "steerable"  # attribute-conditioned (or plain) SFT, SteerLM 2.0, bootstrap
    regression_apm = "regression_apm"
    generative_apm = "generative_apm"


@dataclass(frozen=True)
class ExportSource:
    """A steerlm checkpoint and what its saved config says about exporting it (no weights read)."""

    path: Path
    saved: DictConfig
    kind: ModelKind
    model: ModelConfig
    dtype: DType  # the weights' dtype in the checkpoint
    step: int
    tokenizer: TokenizerConfig | None
    schema: AttributeSchema | None
    template: SteerLMTemplate | None

    @property
    def family(self) -> HFArchitecture:
        """The HF model family an export writes (`hf_architecture`)."""
        return hf_architecture(self.model)

    @property
    def architecture(self) -> str:
        """The HF class an export writes: the family's sequence classifier for a regression APM, else its LM."""
        family = self.family
        return family.sequence_classifier if self.kind == ModelKind.regression_apm else family.causal_lm

    @property
    def num_attributes(self) -> int | None:
        return len(self.schema.attributes) if self.kind == ModelKind.regression_apm and self.schema else None


def saved_train_config(saved: DictConfig) -> TrainConfig:
    """A checkpoint's saved config as its recipe's dataclass (told apart by the recipe's own section)."""
    schema: type = TrainConfig
    recipes = (("bootstrap", BootstrapConfig), ("apm", AttributeModelConfig), ("sft", SFTConfig))
    for section, kind in (*recipes, ("pretrain", PretrainConfig)):
        if section in saved:
            schema = kind
            break
    return to_typed(saved, schema)


def _tokenizer_config(saved: DictConfig, tokenizer_path: str | None) -> TokenizerConfig | None:
    """The checkpoint's tokenizer (its path replaced by `tokenizer_path`); without one in the checkpoint,
    `tokenizer_path` alone names it (a word vocabulary or a Hugging Face directory)."""
    if "tokenizer" in saved:
        config = to_typed(saved.tokenizer, TokenizerConfig)
        config.path = tokenizer_path or config.path
    elif tokenizer_path is not None:
        kind = TokenizerType.word if (Path(tokenizer_path) / VOCAB_FILE).is_file() else TokenizerType.hf
        config = TokenizerConfig(type=kind, path=tokenizer_path)
    else:
        return None
    if not Path(config.path).is_dir():
        raise ConfigError(
            "tokenizer_path",
            config.path,
            "the checkpoint's tokenizer directory does not exist (relative paths are resolved from the current "
            "directory)",
            "run from the training directory or pass tokenizer_path=<the tokenizer directory>",
        )
    return config


def read_export_source(location: str, tokenizer_path: str | None) -> ExportSource:
    """The checkpoint `location` names, its kind, shape, dtype, tokenizer, schema and template."""
    try:
        path = resolve_checkpoint(location)
    except FileNotFoundError as error:
        raise ConfigError(
            "input",
            location,
            str(error).split("; ")[0],
            "pass a steerlm training output_dir, one of its checkpoints/step_* directories, or a Hugging Face "
            "Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3, Gemma or Gemma 2 directory (config.json + *.safetensors)",
        ) from None
    saved = saved_config(path)
    model = to_typed(saved.model, ModelConfig)
    try:
        hf_architecture(model)
    except ValueError as error:
        raise ConfigError(
            "input", location, str(error), "export a Llama-, Nemotron-, Qwen2- or Qwen3-shaped checkpoint"
        ) from None
    dtype = to_typed(saved.precision, PrecisionConfig).dtype if "precision" in saved else DType.fp32
    schema, template = None, None
    if "apm" in saved:
        generative = saved.apm.type == APMType.generative.value
        kind = ModelKind.generative_apm if generative else ModelKind.regression_apm
        schema = to_typed(saved.attributes, AttributesConfig).schema()
        template = SteerLMTemplate(schema)  # the template AttributeScorer reads with
    elif "attributes" in saved and "tokenizer" in saved:
        kind = ModelKind.steerable
        setup = read_checkpoint_setup(location, "input", tokenizer_path)
        schema, template = setup.schema, setup.template
    else:
        kind = ModelKind.language_model
    tokenizer = _tokenizer_config(saved, tokenizer_path)
    if kind != ModelKind.language_model and tokenizer is None:
        raise ConfigError("input", location, "has no tokenizer in its config", "pass tokenizer_path=<directory>")
    step = read_meta(path).step
    return ExportSource(path, saved, kind, model, dtype, step, tokenizer, schema, template)
