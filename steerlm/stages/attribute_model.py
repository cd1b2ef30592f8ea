"""Stage 1: train the Attribute Prediction Model (APM), regression or generative, and evaluate it.

`run`: config → tokenizer + schema → labelled conversations → APM examples → the one training loop with the
attribute-regression task → per-attribute metrics on the held-out rows (`eval.json`; at every validation
also metrics.jsonl and TensorBoard). `evaluate`: a trained APM checkpoint + any labelled file → the same
metrics (`recipes/evaluate_attribute_model.py`). Both score through `AttributeScorer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import latest_checkpoint, saved_config
from steerlm.config import AttributeModelConfig, ConfigError, save_resolved, validate_vocab
from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig
from steerlm.config.schema import APMType
from steerlm.config.validation import data_parallel_size, validate_model_layout
from steerlm.data.apm import (
    AttributeExample,
    attribute_batch,
    attribute_examples,
    attribute_string_budget,
    generative_examples,
    labelled_turns,
)
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import Batch, Example, pad_batch
from steerlm.data.lengths import LengthStats
from steerlm.data.readers import BadRowPolicy, DataFormat, read_records
from steerlm.data.records import Conversation
from steerlm.data.sampler import global_batch_indices, held_out
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.evaluation.apm_metrics import REWARD, metric_scalars
from steerlm.files import atomic_write_text
from steerlm.inference.scoring import (
    AttributeScorer,
    GenerativeAttributeScorer,
    check_rated_attributes,
    open_apm_checkpoint,
)
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.gpt import build_model_chunks
from steerlm.stages.runner import EVAL_FILE, StageContext, StageData, TrainingStage, run_stage
from steerlm.stages.sft import check_rating_columns
from steerlm.tokenizers import Tokenizer, load_tokenizer
from steerlm.training import ATTRIBUTE_REGRESSION, LANGUAGE_MODEL, Task
from steerlm.training.batching import length_sorted_order
from steerlm.training.init_from import InitSource, check_init_tokenization, check_tokenization, resolve_init_source
from steerlm.training.loop import TrainingOutcome, prepare_output_dir
from steerlm.training.losses import attribute_regression_loss

log = logging.getLogger(__name__)
_E = TypeVar("_E", AttributeExample, Example)  # the examples a stage batches (APM or language-model ones)


@dataclass(frozen=True)
class APMResult:
    layout: str
    last_step: int
    train_examples: int
    validation_examples: int
    length: str
    metrics: dict


def _split(examples: list[AttributeExample], fraction: float) -> tuple[list, list]:
    """Deterministic hold-out by a hash of each row's source (stable across runs, layouts and stages)."""
    return (
        [e for e in examples if not held_out(e.source, fraction)],
        [e for e in examples if held_out(e.source, fraction)],
    )


def apm_template(cfg: AttributeModelConfig, schema: AttributeSchema) -> SteerLMTemplate:
    """The template APM inputs are rendered and tokenised with (NeMo's literals, the run's tokenization)."""
    return SteerLMTemplate(schema, TemplateConfig(tokenization=cfg.template.tokenization))


def load_examples(
    cfg: AttributeModelConfig, schema: AttributeSchema, tokenizer, reserved: int = 0
) -> tuple[list, list, LengthStats]:
    """Training and validation examples; `reserved` positions are kept free (a generative APM's string)."""
    template = apm_template(cfg, schema)
    stats = LengthStats()

    check_columns = DataFormat(cfg.data.format).has_rating_columns

    def checked(records: Iterable[Conversation]) -> Iterator[Conversation]:
        for record in records:
            if check_columns:
                check_rating_columns(record, schema)
            yield record

    def read(path: str) -> list[AttributeExample]:
        records = checked(read_records(path, cfg.data.format, schema, cfg.data.on_bad_row))
        return attribute_examples(
            records, schema, template, tokenizer, cfg.trainer.seq_length - reserved, cfg.data.length_policy, stats
        )

    train = read(cfg.data.train_file)
    if cfg.data.validation_file is not None:
        return train, read(cfg.data.validation_file), stats
    train, valid = _split(train, cfg.data.validation_fraction)
    return train, valid, stats


@dataclass(frozen=True)
class APMInputs:
    schema: AttributeSchema
    tokenizer: Tokenizer
    train: list[AttributeExample]
    valid: list[AttributeExample]
    lengths: LengthStats


class AttributeModelStage(TrainingStage[AttributeModelConfig, APMInputs]):
    """Stage 1 on the one runner: regression (an attribute head, masked MSE) or generative (an LM trained on
    the attribute strings); per-attribute metrics of the held-out rows at every validation and at the end."""

    def prepare(self, cfg: AttributeModelConfig, output_dir: Path) -> InitSource | None:
        schema = cfg.attributes.schema()
        _check_checkpoint_schema(cfg, output_dir, schema)
        generative = cfg.apm.type == APMType.generative
        if generative and (cfg.parallel.virtual_pipeline_model_parallel_size or 1) > 1:
            raise ConfigError(
                "apm.type",
                cfg.apm.type.value,
                "is evaluated by greedy generation, which runs one model chunk per pipeline stage",
                "unset parallel.virtual_pipeline_model_parallel_size, or apm.type=regression",
            )
        init = resolve_init_source("apm.init_from", cfg.apm.init_from, cfg.model, None if generative else schema)
        return check_init_tokenization(init, cfg.template.tokenization)

    def load_data(self, cfg: AttributeModelConfig, output_dir: Path) -> APMInputs:
        schema = cfg.attributes.schema()
        tokenizer = load_tokenizer(
            cfg.tokenizer.type.value, cfg.tokenizer.path, cfg.template.tokenization.markers_are_tokens
        )
        validate_vocab(cfg.model, tokenizer.vocab_size, cfg.tokenizer.path)
        generative = cfg.apm.type == APMType.generative
        reserved = attribute_string_budget(schema, tokenizer, apm_template(cfg, schema)) if generative else 0
        train, valid, lengths = load_examples(cfg, schema, tokenizer, reserved)
        if not train:
            raise ConfigError(
                "data.train_file",
                cfg.data.train_file,
                "holds no labelled assistant turn",
                "give rows with attribute labels",
            )
        log.info("APM data: %d train / %d validation examples; %s", len(train), len(valid), lengths.summary())
        return APMInputs(schema, tokenizer, train, valid, lengths)

    def model_provider(self, cfg: AttributeModelConfig):
        if cfg.apm.type == APMType.generative:
            return build_model_chunks
        return partial(build_attribute_model_chunks, num_attributes=len(cfg.attributes.attributes))

    def task(self, cfg: AttributeModelConfig) -> Task:
        if cfg.apm.type == APMType.generative:
            return LANGUAGE_MODEL
        weights = None if cfg.apm.attribute_weights is None else torch.tensor(cfg.apm.attribute_weights)
        return Task(
            ATTRIBUTE_REGRESSION.forward,
            partial(attribute_regression_loss, weights=weights),
            ATTRIBUTE_REGRESSION.predict,
        )

    def _scorer(self, ctx: StageContext[AttributeModelConfig], inputs: APMInputs):
        cfg = ctx.cfg
        kind = GenerativeAttributeScorer if cfg.apm.type == APMType.generative else AttributeScorer
        return kind(
            ctx.setup.model,
            ctx.layout,
            inputs.schema,
            inputs.tokenizer,
            seq_length=cfg.trainer.seq_length,
            micro_batch_size=cfg.trainer.micro_batch_size,
            length_policy=cfg.data.length_policy,
            merge_weights=cfg.apm.reward_weights(inputs.schema),
            tokenization=cfg.template.tokenization,
        )

    def batches(self, ctx: StageContext[AttributeModelConfig], inputs: APMInputs) -> StageData:
        if ctx.cfg.apm.type == APMType.generative:
            template = apm_template(ctx.cfg, inputs.schema)
            train_inputs, valid_inputs = (
                generative_examples(split, inputs.schema, inputs.tokenizer, template)
                for split in (inputs.train, inputs.valid)
            )
            return self._stage_data(ctx, inputs, train_inputs, valid_inputs, pad_batch)
        return self._stage_data(ctx, inputs, inputs.train, inputs.valid, attribute_batch)

    def _stage_data(
        self,
        ctx: StageContext[AttributeModelConfig],
        inputs: APMInputs,
        train_inputs: Sequence[_E],
        valid_inputs: Sequence[_E],
        collate: Callable[[Sequence[_E], int], Batch],
    ) -> StageData:
        trainer, pad_id = ctx.cfg.trainer, inputs.tokenizer.pad_id

        def train_batch(step: int) -> Batch:
            rows = global_batch_indices(len(train_inputs), trainer.global_batch_size, step, trainer.seed)
            examples = [train_inputs[i] for i in rows]
            # micro-batches of similar lengths, each then cut to its longest (steerlm.training.batching)
            order = length_sorted_order([len(e.ids) for e in examples], trainer.micro_batch_size, ctx.layout.dp)
            return collate([examples[i] for i in order], pad_id)

        rows = trainer.global_batch_size
        valid = [collate(valid_inputs[i : i + rows], pad_id) for i in range(0, len(inputs.valid) - rows + 1, rows)]
        scorer = self._scorer(ctx, inputs)
        return StageData(train_batch, valid, lambda: metric_scalars(scorer.metrics(inputs.valid)))

    def report(
        self, ctx: StageContext[AttributeModelConfig], inputs: APMInputs, outcome: TrainingOutcome, before
    ) -> APMResult:
        metrics = self._scorer(ctx, inputs).metrics(inputs.valid)
        if ctx.layout.is_rank_zero:
            log_metrics(metrics)
        return APMResult(
            layout=ctx.layout.describe(),
            last_step=outcome.last_step,
            train_examples=len(inputs.train),
            validation_examples=len(inputs.valid),
            length=inputs.lengths.summary(),
            metrics=metrics,
        )


def run(cfg: AttributeModelConfig) -> APMResult:
    return run_stage(AttributeModelStage(), cfg)


@dataclass(frozen=True)
class APMEvaluation:
    apm_checkpoint: str
    input: str
    layout: str
    examples: int
    length: str
    merge_weights: list[float] | None
    metrics: dict


def read_evaluation_data(cfg: EvaluateAttributeModelConfig, schema: AttributeSchema) -> list[Conversation]:
    """The conversations of `cfg.input` (held-out ones only with `validation_fraction`), checked against the
    APM's schema: a label it lacks is the reader's DataError (file:line), a rating column a ConfigError."""
    records = []
    for record in read_records(cfg.input, cfg.format, schema, BadRowPolicy.error):
        check_rated_attributes(record, schema, "apm_checkpoint", cfg.apm_checkpoint)
        if cfg.validation_fraction is None or held_out(record.source, cfg.validation_fraction):
            records.append(record)
    if not any(labelled_turns(record, index) for record in records for index in range(len(record.turns))):
        raise ConfigError(
            "input",
            cfg.input,
            f"holds no assistant turn labelled with the APM's attributes "
            f"({', '.join(schema.attributes)})" + (" among the held-out rows" if records else ""),
            "pass a labelled file in its format=… (or check validation_fraction)",
        )
    return records


def evaluate(cfg: EvaluateAttributeModelConfig) -> APMEvaluation:
    """Score every labelled assistant turn of `cfg.input` with the APM; per-attribute metrics → `eval.json`."""
    cfg.validate()
    apm = open_apm_checkpoint(cfg.apm_checkpoint, "apm_checkpoint")
    data_parallel_size(cfg.parallel, runtime.launch_world_size())
    validate_model_layout(apm.config.model, cfg.parallel, runtime.detect_accelerator())
    records = read_evaluation_data(cfg, apm.schema)
    output_dir = prepare_output_dir(cfg.output_dir)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        scorer = AttributeScorer.from_checkpoint(
            apm,
            layout,
            micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.seq_length or apm.config.trainer.seq_length,
            length_policy=cfg.length_policy,
            seed=cfg.seed,
            verify=cfg.verify_checkpoint,
        )
        lengths = LengthStats()
        examples = scorer.examples(records, labelled_turns, lengths)
        result = APMEvaluation(
            apm_checkpoint=str(apm.path),
            input=cfg.input,
            layout=layout.describe(),
            examples=len(examples),
            length=lengths.summary(),
            merge_weights=None if scorer.merge_weights is None else list(scorer.merge_weights),
            metrics=scorer.metrics(examples),
        )
        if layout.is_rank_zero:
            save_resolved(cfg, output_dir / "config.yaml")
            atomic_write_text(output_dir / EVAL_FILE, json.dumps(asdict(result), indent=2) + "\n")
            log.info("%s: %d examples (%s), %s", cfg.input, len(examples), lengths.summary(), layout.describe())
            log_metrics(result.metrics)
        return result
    finally:
        runtime.shutdown()


def _check_checkpoint_schema(cfg: AttributeModelConfig, output_dir: Path, schema: AttributeSchema) -> None:
    """An APM checkpoint's head belongs to its schema: refuse to resume it with other attributes."""
    path = latest_checkpoint(output_dir) if cfg.checkpoint.resume else None
    if path is None:
        return
    check_tokenization(path, cfg.template.tokenization, "resuming")
    trained = list(saved_config(path).attributes.attributes)
    if trained != list(schema.attributes):
        raise ConfigError(
            "attributes.attributes",
            list(schema.attributes),
            f"checkpoint {path} was trained for the attributes {trained}",
            "use the checkpoint's schema, a new output_dir, or checkpoint.resume=false",
        )


def log_metrics(metrics: dict) -> None:
    """The per-attribute table (and the reward's line, when merging) to the log."""
    for name, values in metrics["attributes"].items():
        log.info(
            "%-12s MAE %.3f RMSE %.3f Pearson %.3f Spearman %.3f exact %.3f (n=%d)",
            name,
            values["mae"],
            values["rmse"],
            values["pearson"],
            values["spearman"],
            values["exact_match"],
            values["count"],
        )
    log.info("mean Pearson %.3f", metrics["mean"]["pearson"])
    if "generation" in metrics:
        generation = metrics["generation"]
        log.info(
            "generative APM: %d of %d attribute strings complete; unwritten or unreadable: %s",
            generation["complete"],
            generation["rows"],
            generation["unwritten"] or "none",
        )
    if REWARD in metrics:
        reward = metrics[REWARD]
        log.info(
            "%-12s MAE %.3f RMSE %.3f Pearson %.3f Spearman %.3f (n=%d)",
            REWARD,
            reward["mae"],
            reward["rmse"],
            reward["pearson"],
            reward["spearman"],
            reward["count"],
        )
