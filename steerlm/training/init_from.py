"""Start a run from other weights: `sft.init_from` and `apm.init_from`.

The source is a steerlm run directory or checkpoint (written at any TP/PP layout: a language model from
`recipes/demo.py` / `train_sft.py`, or an APM), a Hugging Face Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3, Gemma or
Gemma 2 directory (`config.json` + `*.safetensors`, as `save_pretrained` writes it) or a NeMo 1.x `.nemo` model (the tar
or its extracted directory, read in place by every rank: `steerlm.models.nemo_weights`). `resolve_init_source` runs
before anything is built, so a wrong shape or schema stops the run naming the key; `load_init_weights` then fills this
layout's shards. Only weights move: the optimizer, LR schedule and step start fresh.

An attribute head is loaded from an APM source of the same schema, refused from an APM of another schema,
and keeps its fresh initialisation when the source has none (a language model, or HF); an APM source's
head is ignored by a language model. A NeMo-Aligner reward model's head counts as an APM's whose outputs are the
run's attributes in schema order (NeMo records no names): it must have one output per attribute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig

from steerlm.checkpoint.sharded import (
    SHAPE_FIELDS,
    latest_checkpoint,
    read_meta,
    read_weights,
    resolve_checkpoint,
    saved_config,
)
from steerlm.checkpoint.sources import BaseWeights, WeightFormat
from steerlm.config.lora import LoraCheckpoint
from steerlm.config.model import FUNCTION_FIELDS
from steerlm.config.schema import ModelConfig, TrainConfig, is_hf_model_dir, is_nemo_archive, written_model_field
from steerlm.data.attributes import AttributeSchema
from steerlm.data.template import Tokenization
from steerlm.errors import ConfigError
from steerlm.models.attribute import is_head
from steerlm.models.hf_config import check_hf_config
from steerlm.models.hf_llama import read_hf_config
from steerlm.models.nemo_config import check_nemo_model
from steerlm.models.nemo_weights import NemoCheckpoint
from steerlm.models.sharding import named_global_parameters
from steerlm.runtime.layout import ParallelLayout
from steerlm.training.loop import maybe_resume
from steerlm.training.setup import TrainingSetup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitSource:
    key: str  # the config key that named it, e.g. "apm.init_from"
    location: str  # as configured
    path: Path  # the checkpoint directory, the HF model directory, or the .nemo archive
    format: WeightFormat
    has_head: bool  # an APM (or reward model) fitting this run's schema: its attribute head is loaded too


def resolve_init_source(
    key: str, location: str | None, model: ModelConfig, schema: AttributeSchema | None = None
) -> InitSource | None:
    """The weights `key` names, checked against this run's `model` (and, for an APM, its `schema`).

    Returns None when `location` is None. A shape difference is a ConfigError naming `model.<field>` and
    the value to set; an APM source of another schema is a ConfigError naming `key`.
    """
    if location is None:
        return None
    path = Path(location)
    if is_nemo_archive(path):
        return _resolve_nemo(key, location, path, model, schema)
    if is_hf_model_dir(path):
        check_hf_config(read_hf_config(path), model, key, location)
        return InitSource(key, location, path, WeightFormat.hugging_face, has_head=False)
    try:
        path = resolve_checkpoint(path)
    except FileNotFoundError as error:
        raise ConfigError(
            key,
            location,
            str(error).split("; ")[0],
            "pass a steerlm training output_dir, one of its checkpoints/step_* directories, a Hugging Face "
            "Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3, Gemma or Gemma 2 directory (config.json + *.safetensors) "
            "or a NeMo .nemo model",
        ) from None
    written = read_meta(path).model
    for name in (*SHAPE_FIELDS, *FUNCTION_FIELDS):
        value = getattr(model, name)
        value = value.value if isinstance(value, Enum) else value
        theirs = written_model_field(written, name)
        if theirs != value:
            raise ConfigError(
                f"model.{name}",
                value,
                f"{key}={location} was written for model.{name}={theirs!r}",
                f"set model.{name}={theirs!r} or pass another {key}",
            )
    saved = saved_config(path)
    is_apm = "apm" in saved
    if is_apm and schema is not None:
        _check_head_schema(key, location, saved.attributes, schema)
    return InitSource(key, location, path, WeightFormat.steerlm, has_head=is_apm and schema is not None)


def _resolve_nemo(
    key: str, location: str, path: Path, model: ModelConfig, schema: AttributeSchema | None
) -> InitSource:
    with NemoCheckpoint(path) as source:
        check_nemo_model(source.model, model, key, location)
        head = source.nemo.reward_head
    if head is not None and schema is not None and head.num_attributes != len(schema.attributes):
        raise ConfigError(
            key,
            location,
            f"is a reward model with {head.num_attributes} attribute outputs, this run's schema "
            f"'{schema.name}' has {len(schema.attributes)}",
            "initialise from a language model (the head then starts fresh) or set attributes to a schema of "
            f"{head.num_attributes} attributes in the head's output order",
        )
    return InitSource(key, location, path, WeightFormat.nemo, has_head=head is not None and schema is not None)


def _check_head_schema(key: str, location: str, saved, schema: AttributeSchema) -> None:
    """An APM's head emits its own schema's attributes on its own range: refuse to start another schema's."""
    theirs = (list(saved.attributes), float(saved.min_value), float(saved.max_value))
    ours = (list(schema.attributes), schema.min_value, schema.max_value)
    if theirs != ours:
        raise ConfigError(
            key,
            location,
            f"is an APM for the attributes {theirs[0]} on [{theirs[1]:g}, {theirs[2]:g}], "
            f"this run's schema is {ours[0]} on [{ours[1]:g}, {ours[2]:g}]",
            "initialise from an APM of this schema or from a language model (the head then starts "
            "fresh), or set attributes to the checkpoint's",
        )


def load_init_weights(
    source: InitSource, setup: TrainingSetup, layout: ParallelLayout, model: ModelConfig, verify: bool = True
) -> None:
    """Collective: copy the source's weights into this rank's shards (any layout), before step 1.

    Under bf16/fp16 the optimizer's fp32 main weights are refreshed from the loaded ones. A steerlm source is
    checked against its checksums when `verify` (checkpoint.verify).
    """

    def fresh_head(name: str) -> bool:  # a Hugging Face source never has one
        return is_head(name) and not source.has_head

    # a steerlm source's own adapters are merged into its weights; a LoRA run's adapters start fresh from any source
    read_weights(source.format, source.path, setup.chunks, layout, model, keep=fresh_head, verify=verify)
    setup.optimizer.reload_model_params()
    head = any(is_head(name) for name, _ in named_global_parameters(setup.chunks))
    log.info(
        "initialised the weights from %s (%s)%s",
        source.path,
        source.format.value,
        "" if not head else "; attribute head " + ("loaded" if source.has_head else "freshly initialised"),
    )


def resume_or_initialise(
    cfg: TrainConfig, output_dir: Path, setup: TrainingSetup, layout: ParallelLayout, init: InitSource | None
) -> int:
    """The step a run starts after: its own latest checkpoint when it has one (init_from is used only by a
    run's first start), otherwise 0 with `init`'s weights loaded (or the fresh initialisation). Sets `setup.base`:
    the weights a LoRA run's checkpoints leave out (`lora.checkpoint`)."""
    if cfg.checkpoint.resume and latest_checkpoint(output_dir) is not None:
        if init is not None:
            log.info("resuming %s; %s is used only by a run's first start", output_dir, init.key)
        step = maybe_resume(cfg, output_dir, setup, layout)
        setup.base = _resumed_base(cfg, latest_checkpoint(output_dir))
        return step
    setup.base = _fresh_base(cfg, init)
    if init is not None:
        load_init_weights(init, setup, layout, cfg.model, cfg.checkpoint.verify)
    return 0


def _fresh_base(cfg: TrainConfig, init: InitSource | None) -> BaseWeights | None:
    """What a new LoRA run's checkpoints name as their base when they hold the adapters alone (None: they are
    self-contained)."""
    mode = cfg.lora.checkpoint
    if not cfg.lora.enabled or mode == LoraCheckpoint.full:
        return None
    if init is None:
        if mode == LoraCheckpoint.adapters:
            raise ConfigError(
                "lora.checkpoint",
                mode.value,
                "saves the adapters alone, but this run starts from no init_from: its frozen weights are its own "
                "random initialisation, held in no other file",
                "set the stage's init_from to the model to adapt, or lora.checkpoint=full",
            )
        return None
    base = BaseWeights.of(init.format, init.path)
    log.info("checkpoints hold the LoRA adapters alone; their base is %s (%s)", base.path, base.format)
    return base


def _resumed_base(cfg: TrainConfig, checkpoint: Path | None) -> BaseWeights | None:
    """A resumed run goes on saving as it did (`auto`); `full` makes the next checkpoints self-contained, and
    `adapters` is refused for a run whose checkpoints name no base."""
    saved = read_meta(checkpoint).base if checkpoint is not None else None
    mode = cfg.lora.checkpoint
    if saved is None and mode == LoraCheckpoint.adapters:
        raise ConfigError(
            "lora.checkpoint",
            mode.value,
            f"this run's checkpoints ({checkpoint}) hold their frozen weights, so no base is known to hold them",
            "resume with lora.checkpoint=auto or full",
        )
    if saved is None or mode == LoraCheckpoint.full:
        return None
    return BaseWeights(**saved)


def trained_tokenization(saved: DictConfig) -> Tokenization:
    """The `template.tokenization` a checkpoint's saved config was trained with (`markers` for a config without
    a template section: every run before the option, and language models that never saw the template)."""
    template = saved.get("template") or {}
    return Tokenization(template.get("tokenization", Tokenization.markers.value))


def check_tokenization(checkpoint: Path, tokenization: Tokenization, what: str) -> None:
    """Refuse to continue (`what`: "resume" or the init key) a checkpoint trained under another tokenization:
    its ids mean other text, and under `markers` its vocabulary may hold the three added marker rows."""
    trained = trained_tokenization(saved_config(checkpoint))
    if trained != tokenization:
        raise ConfigError(
            "template.tokenization",
            tokenization.value,
            f"{what} reads {checkpoint}, which was trained with template.tokenization={trained.value}",
            f"set template.tokenization={trained.value}, or start from other weights",
        )


def check_init_tokenization(source: InitSource | None, tokenization: Tokenization) -> InitSource | None:
    """`source`, once its weights are known to be trained under `tokenization` (Hugging Face weights never saw
    the template, so any tokenization starts from them; a `.nemo` archive's weights saw NeMo's ids when NeMo-Aligner
    trained them, and a pretrained one's never saw the template, so any tokenization starts from those too)."""
    if source is not None and source.format == WeightFormat.steerlm:
        check_tokenization(source.path, tokenization, source.key)
    return source
