"""Stage 1: train the regression Attribute Prediction Model (APM) and evaluate it.

config → tokenizer + schema → labelled conversations → APM examples → the one training loop with the
attribute-regression task → per-attribute metrics on the held-out rows (`eval.json`, TensorBoard).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from steerlm import runtime
from steerlm.config import AttributeModelConfig, ConfigError, save_resolved, validate_train_config, validate_vocab
from steerlm.data.apm import AttributeExample, attribute_batch, attribute_examples
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import LengthStats, length_buckets
from steerlm.data.readers import read_records
from steerlm.data.sampler import global_batch_indices, held_out
from steerlm.data.template import SteerLMTemplate
from steerlm.evaluation.apm_metrics import attribute_metrics
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.tokenizers import load_tokenizer
from steerlm.training import ATTRIBUTE_REGRESSION, Task, build_training, predict
from steerlm.training.checkpoint import latest_checkpoint, saved_config
from steerlm.training.loop import maybe_resume, prepare_output_dir, run_training
from steerlm.training.losses import attribute_regression_loss

log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"


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
    return ([e for e in examples if not held_out(e.source, fraction)],
            [e for e in examples if held_out(e.source, fraction)])


def load_examples(cfg: AttributeModelConfig, schema: AttributeSchema, tokenizer) -> tuple[list, list, LengthStats]:
    template = SteerLMTemplate(schema)
    stats = LengthStats()

    def read(path: str) -> list[AttributeExample]:
        records = read_records(path, cfg.data.format, schema, cfg.data.on_bad_row)
        return attribute_examples(records, schema, template, tokenizer, cfg.trainer.seq_length,
                                  cfg.data.length_policy, stats)

    train = read(cfg.data.train_file)
    if cfg.data.validation_file is not None:
        return train, read(cfg.data.validation_file), stats
    train, valid = _split(train, cfg.data.validation_fraction)
    return train, valid, stats


def score_examples(model: list, examples: list[AttributeExample], micro_batch_size: int, pad_id: int,
                   layout: runtime.ParallelLayout) -> np.ndarray:
    """`[len(examples), attributes]` APM scores, identical on every rank.

    Examples are bucketed by length into batches whose composition depends only on `examples`, and
    batch b is scored by data-parallel rank b mod dp, so any DP size computes exactly the same numbers.
    """
    local: dict[int, list[float]] = {}
    for number, members in enumerate(length_buckets([len(e.ids) for e in examples], micro_batch_size)):
        if number % layout.dp == layout.dp_rank:
            batch = attribute_batch([examples[i] for i in members], pad_id)
            scores = predict(model, [batch], layout, ATTRIBUTE_REGRESSION)[0].cpu()
            local.update({i: row.tolist() for i, row in zip(members, scores)})
    gathered: list[dict] = [{} for _ in range(layout.world_size)]
    torch.distributed.all_gather_object(gathered, local)
    merged = {index: row for part in gathered for index, row in part.items()}
    if not examples:
        return np.zeros((0, 0))
    return np.array([merged[i] for i in range(len(examples))], dtype=np.float64).reshape(len(examples), -1)


def run(cfg: AttributeModelConfig) -> APMResult:
    validate_train_config(cfg, runtime.launch_world_size(), runtime.detect_accelerator())
    for section in (cfg.tokenizer, cfg.data, cfg.attributes):
        section.validate()
    schema = cfg.attributes.schema()
    cfg.apm.validate(schema)
    tokenizer = load_tokenizer(cfg.tokenizer.type.value, cfg.tokenizer.path)
    validate_vocab(cfg.model, tokenizer.vocab_size, cfg.tokenizer.path)
    train, valid, lengths = load_examples(cfg, schema, tokenizer)
    if not train:
        raise ConfigError("data.train_file", cfg.data.train_file, "holds no labelled assistant turn",
                          "give rows with attribute labels")
    log.info("APM data: %d train / %d validation examples; %s", len(train), len(valid), lengths.summary())
    output_dir = prepare_output_dir(cfg.output_dir)
    layout = runtime.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        if layout.is_rank_zero:
            save_resolved(cfg, output_dir / "config.yaml")
        provider = partial(build_attribute_model_chunks, num_attributes=len(schema.attributes))
        setup = build_training(cfg, layout, model_provider=provider)
        weights = None if cfg.apm.attribute_weights is None else torch.tensor(cfg.apm.attribute_weights)
        task = Task(ATTRIBUTE_REGRESSION.forward, partial(attribute_regression_loss, weights=weights),
                    ATTRIBUTE_REGRESSION.predict)
        _check_checkpoint_schema(cfg, output_dir, schema)
        start = maybe_resume(cfg, output_dir, setup, layout)
        trainer = cfg.trainer

        def train_batch(step: int):
            rows = global_batch_indices(len(train), trainer.global_batch_size, step, trainer.seed)
            return attribute_batch([train[i] for i in rows], tokenizer.pad_id)

        valid_batches = [attribute_batch(valid[i:i + trainer.global_batch_size], tokenizer.pad_id)
                         for i in range(0, len(valid) - trainer.global_batch_size + 1, trainer.global_batch_size)]
        outcome = run_training(setup, layout, cfg, output_dir, train_batch, start_step=start,
                               valid_batches=(lambda: valid_batches) if valid_batches else None, task=task)
        scores = score_examples(setup.model, valid, trainer.micro_batch_size, tokenizer.pad_id, layout)
        targets = np.array([example.targets for example in valid])
        metrics = attribute_metrics(scores, targets, schema)
        result = APMResult(layout=layout.describe(), last_step=outcome.last_step, train_examples=len(train),
                           validation_examples=len(valid), length=lengths.summary(), metrics=metrics)
        if layout.is_rank_zero:
            (output_dir / EVAL_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
            _log_metrics(metrics)
        return result
    finally:
        runtime.shutdown()


def _check_checkpoint_schema(cfg: AttributeModelConfig, output_dir: Path, schema: AttributeSchema) -> None:
    """An APM checkpoint's head belongs to its schema: refuse to resume it with other attributes."""
    path = latest_checkpoint(output_dir) if cfg.checkpoint.resume else None
    if path is None:
        return
    trained = list(saved_config(path).attributes.attributes)
    if trained != list(schema.attributes):
        raise ConfigError("attributes.attributes", list(schema.attributes),
                          f"checkpoint {path} was trained for the attributes {trained}",
                          "use the checkpoint's schema, a new output_dir, or checkpoint.resume=false")


def _log_metrics(metrics: dict) -> None:
    for name, values in metrics["attributes"].items():
        log.info("%-12s MAE %.3f RMSE %.3f Pearson %.3f Spearman %.3f exact %.3f (n=%d)", name, values["mae"],
                 values["rmse"], values["pearson"], values["spearman"], values["exact_match"], values["count"])
    log.info("mean Pearson %.3f", metrics["mean"]["pearson"])
