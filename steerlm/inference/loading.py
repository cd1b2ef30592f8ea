"""A SteerLM checkpoint → a ready `Generator` and everything needed to build its prompts.

A checkpoint carries the resolved config it was trained with: the model shape, the tokenizer, the
attribute schema and the template switches (`sft.*`). Loading reads those, builds the model at the
serving layout (any TP size; checkpoints are layout-independent) and loads the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from steerlm import runtime
from steerlm.checkpoint.sharded import load_weights, resolve_checkpoint, saved_config
from steerlm.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, to_typed
from steerlm.config.schema import AttributesConfig, TokenizerConfig
from steerlm.config.sft import SFTOptions
from steerlm.config.validation import data_parallel_size, validate_model_layout
from steerlm.data.attributes import AttributeSchema
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.inference.generate import Generator
from steerlm.models.gpt import build_model_chunks
from steerlm.runtime.layout import ParallelLayout
from steerlm.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSetup:
    """What a checkpoint's saved config says about serving it (no weights loaded)."""

    path: Path
    model: ModelConfig
    tokenizer_config: TokenizerConfig
    schema: AttributeSchema
    template: SteerLMTemplate


@dataclass(frozen=True)
class LoadedModel:
    generator: Generator
    template: SteerLMTemplate
    schema: AttributeSchema
    tokenizer: Tokenizer
    model: ModelConfig
    path: Path
    step: int


def read_checkpoint_setup(
    checkpoint: str, key: str = "checkpoint", tokenizer_path: str | None = None
) -> CheckpointSetup:
    """The checkpoint's model, tokenizer, schema and template; ConfigError naming `key` when it cannot serve."""
    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as error:
        raise ConfigError(
            key,
            checkpoint,
            str(error).split("; ")[0],
            "pass a recipes/train_sft.py output_dir or one of its checkpoints/step_* directories",
        ) from None
    saved = saved_config(path)
    if "attributes" not in saved or "tokenizer" not in saved:
        raise ConfigError(
            key,
            checkpoint,
            f"{path} was not trained on attribute-labelled conversations "
            "(its config has no attributes/tokenizer section)",
            "serve a checkpoint of recipes/train_sft.py",
        )
    tokenizer_config = _section(saved, "tokenizer", TokenizerConfig)
    if tokenizer_path is not None:
        tokenizer_config.path = tokenizer_path
    if not Path(tokenizer_config.path).is_dir():
        raise ConfigError(
            "tokenizer_path",
            tokenizer_config.path,
            f"the tokenizer directory {path} was trained with does not exist (relative paths are "
            "resolved from the current directory)",
            "run from the training directory or pass tokenizer_path=<the tokenizer directory>",
        )
    schema = _section(saved, "attributes", AttributesConfig).schema()
    template = _section(saved, "sft", SFTOptions).template() if "sft" in saved else TemplateConfig()
    return CheckpointSetup(
        path, _section(saved, "model", ModelConfig), tokenizer_config, schema, SteerLMTemplate(schema, template)
    )


def _section(saved: DictConfig, name: str, schema: type):
    return to_typed(saved[name], schema)


def check_inference_layout(parallel: ParallelConfig, models: Sequence[ModelConfig]) -> None:
    """Before anything starts: one model replica over all launched ranks (tensor parallel only), and each
    model's shape splittable at that TP size. ConfigError naming the key otherwise."""
    world = runtime.launch_world_size()
    if data_parallel_size(parallel, world) != 1:
        tp = parallel.tensor_model_parallel_size
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"{world} processes would hold {world // tp} copies of the model; inference runs one",
            f"launch exactly {tp} process(es) (torchrun --nproc-per-node {tp}) or set "
            f"parallel.tensor_model_parallel_size={world}",
        )
    for model in models:
        validate_model_layout(model, parallel, runtime.detect_accelerator())


def load_generator(
    checkpoint: str,
    layout: ParallelLayout,
    precision: PrecisionConfig,
    tokenizer_path: str | None = None,
    seed: int = 0,
    key: str = "checkpoint",
) -> LoadedModel:
    """Build the checkpoint's model at `layout` in `precision`, load its weights, and wrap it for generation.

    The generator stops on the template's end-of-turn token (what SFT trained after every response) and
    on the tokenizer's EOS; its maximum sequence length is the model's `max_position_embeddings`.
    """
    setup = read_checkpoint_setup(checkpoint, key, tokenizer_path)
    tokenizer = load_tokenizer(setup.tokenizer_config.type.value, setup.tokenizer_config.path)
    chunks = build_model_chunks(setup.model, precision, layout, seed)
    step = load_weights(setup.path, chunks, layout, setup.model)
    for chunk in chunks:
        chunk.eval()  # for inference only: decoding steps need not switch modes
    stop_ids = [tokenizer.token_to_id(setup.template.config.end_of_turn)] if setup.template.config.end_of_turn else []
    if tokenizer.eos_id is not None:
        stop_ids.append(tokenizer.eos_id)
    generator = Generator(chunks, tokenizer, layout, setup.model.max_position_embeddings, stop_ids)
    log.info("loaded %s (step %d) for generation at %s", setup.path, step, layout.describe())
    return LoadedModel(generator, setup.template, setup.schema, tokenizer, setup.model, setup.path, step)
