"""A SteerLM checkpoint → a ready `Generator` and everything needed to build its prompts.

A checkpoint carries the resolved config it was trained with: the model shape, the tokenizer, the
attribute schema, the template switches (`sft.*`) and `template.tokenization`. Loading reads those, builds
the model at the serving layout (any TP size; checkpoints are layout-independent) and loads the weights.

A NeMo `.nemo` model is served in place: its model_config.yaml gives the model, its tokenizer is copied out once
(`steerlm.inference.nemo_source`), the schema is NeMo-Aligner's nine SteerLM attributes and the template
NeMo-Aligner's, tokenised as NeMo does (`template.tokenization=nemo`); to serve it with another schema, import
it first (`recipes/convert.py input=x.nemo`).
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
from steerlm.config.schema import AttributesConfig, TokenizerConfig, TokenizerType, is_nemo_archive
from steerlm.config.sft import SFTOptions
from steerlm.config.validation import data_parallel_size, validate_model_layout
from steerlm.data.attributes import AttributeSchema
from steerlm.data.template import SteerLMTemplate
from steerlm.inference.generate import Generator
from steerlm.inference.nemo_source import cached_tokenizer, nemo_attributes, nemo_tokenization
from steerlm.models.gpt import build_model_chunks
from steerlm.models.nemo_weights import NemoCheckpoint
from steerlm.runtime.layout import ParallelLayout
from steerlm.tokenizers import Tokenizer, load_tokenizer
from steerlm.training.init_from import trained_tokenization

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
    if is_nemo_archive(Path(checkpoint)):
        return _nemo_setup(checkpoint, key, tokenizer_path)
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
    tokenization = trained_tokenization(saved)
    sft = _section(saved, "sft", SFTOptions) if "sft" in saved else SFTOptions()
    template = sft.template(tokenization)
    return CheckpointSetup(
        path, _section(saved, "model", ModelConfig), tokenizer_config, schema, SteerLMTemplate(schema, template)
    )


def _nemo_setup(checkpoint: str, key: str, tokenizer_path: str | None) -> CheckpointSetup:
    with NemoCheckpoint(checkpoint) as source:
        if source.nemo.reward_head is not None:
            raise ConfigError(
                key,
                checkpoint,
                "is a NeMo-Aligner reward model, which scores responses instead of writing them",
                "serve a SteerLM language model (a reward model scores once imported: steerlm.stages.nemo_import)",
            )
        tokenizer = tokenizer_path if tokenizer_path is not None else str(cached_tokenizer(source))
        schema = nemo_attributes(checkpoint, None, None, source.config).schema()
        return CheckpointSetup(
            Path(checkpoint),
            source.model,
            TokenizerConfig(type=TokenizerType.hf, path=tokenizer),
            schema,
            SteerLMTemplate(schema, SFTOptions().template(nemo_tokenization(source.config))),
        )


def setup_tokenizer(setup: CheckpointSetup) -> Tokenizer:
    """The checkpoint's tokenizer, with the SteerLM markers as single ids or as text, as it was trained."""
    config = setup.tokenizer_config
    return load_tokenizer(config.type.value, config.path, setup.template.config.tokenization.markers_are_tokens)


def _section(saved: DictConfig, name: str, schema: type):
    return to_typed(saved[name], schema)


def check_inference_layout(parallel: ParallelConfig, models: Sequence[ModelConfig]) -> None:
    """Before anything starts: one model replica over all launched ranks (tensor and pipeline parallel), and
    each model's shape splittable at that layout. ConfigError naming the key otherwise."""
    world = runtime.launch_world_size()
    if data_parallel_size(parallel, world) != 1:
        tp, mp = parallel.tensor_model_parallel_size, parallel.model_parallel_size
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"{world} processes would hold {world // mp} copies of the model; inference runs one",
            f"launch exactly {mp} process(es) (torchrun --nproc-per-node {mp}) or set "
            f"parallel.tensor_model_parallel_size={world * tp // mp}",
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
    verify: bool = True,
) -> LoadedModel:
    """Build the checkpoint's model at `layout` in `precision`, load its weights, and wrap it for generation.

    The generator stops on the template's end of turn (what SFT trained after every response: one token under
    `markers` tokenization, text under `nemo`) and on the tokenizer's EOS; its maximum sequence length is the
    model's `max_position_embeddings`. `verify`: check the checkpoint's checksums first (`verify_checkpoint`).
    """
    setup = read_checkpoint_setup(checkpoint, key, tokenizer_path)
    tokenizer = setup_tokenizer(setup)
    chunks = build_model_chunks(setup.model, precision, layout, seed)
    if is_nemo_archive(setup.path):
        with NemoCheckpoint(setup.path) as source:
            source.load_into(chunks, layout.tp_rank, layout.tp)
        step = 0
    else:
        step = load_weights(setup.path, chunks, layout, setup.model, verify=verify)
    for chunk in chunks:
        chunk.eval()  # for inference only: decoding steps need not switch modes
    end = setup.template.config.end_of_turn
    markers = setup.template.config.tokenization.markers_are_tokens
    stop_ids = [tokenizer.token_to_id(end)] if end and markers else []
    if tokenizer.eos_id is not None:
        stop_ids.append(tokenizer.eos_id)
    stop_strings = [end] if end and not markers else []
    generator = Generator(
        chunks, tokenizer, layout, setup.model.max_position_embeddings, stop_ids, stop_strings=stop_strings
    )
    log.info("loaded %s (step %d) for generation at %s", setup.path, step, layout.describe())
    return LoadedModel(generator, setup.template, setup.schema, tokenizer, setup.model, setup.path, step)
