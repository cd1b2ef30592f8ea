"""Stage 3: attribute-conditioned SFT, and the plain-SFT baseline from the same recipe.

config → tokenizer + schema → labelled conversations → SteerLM-template examples (loss on the responses)
→ the one training loop with the language-model task → validation loss against a unigram baseline
(`eval.json`). `sft.condition_on_attributes=false` renders the same conversations without attribute
lines: the baseline every steerability evaluation compares against.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from steerlm.checkpoint.sharded import latest_checkpoint, saved_config
from steerlm.config import ConfigError, validate_vocab
from steerlm.config.sft import SFTConfig
from steerlm.data.attribute_lines import AttributeLines, attribute_lines, write_attribute_lines
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import (
    Batch,
    Example,
    LengthStats,
    apply_length_policy,
    conversation_example,
    pack_examples,
    packed_batch,
    pad_batch,
)
from steerlm.data.readers import BadRowPolicy, DataFormat, ReadStats, RejectSink, read_records, unschema_ratings
from steerlm.data.records import Conversation
from steerlm.data.sampler import global_batch_indices, held_out
from steerlm.data.template import SteerLMTemplate
from steerlm.stages.runner import StageContext, StageData, TrainingStage, run_stage
from steerlm.tokenizers import Tokenizer, load_tokenizer
from steerlm.training.batching import length_multiple, length_sorted_order
from steerlm.training.init_from import InitSource, check_init_tokenization, check_tokenization, resolve_init_source
from steerlm.training.loop import TrainingOutcome, evaluate

log = logging.getLogger(__name__)


@dataclass
class SFTData:
    """Tokenised examples: `train` holds each distinct training example `repeat` times; `attribute_lines` counts
    the conditioning of the distinct ones (None for the plain-SFT baseline, which has none)."""

    train: list[Example]
    valid: list[Example]
    distinct_train: int
    train_lengths: LengthStats = field(default_factory=LengthStats)
    valid_lengths: LengthStats = field(default_factory=LengthStats)
    attribute_lines: AttributeLines | None = None


@dataclass(frozen=True)
class SFTInputs:
    data: SFTData
    pad_id: int
    baseline: float | None  # unigram cross entropy of the validation tokens


@dataclass(frozen=True)
class SFTResult:
    layout: str
    condition_on_attributes: bool
    packing: bool
    init_from: str | None
    start_step: int
    last_step: int
    stop_reason: str | None
    train_examples: int  # distinct, after the length policy
    repeat: int
    validation_examples: int
    train_tokens: int  # trained (loss) tokens of the distinct training examples
    validation_tokens: int
    epochs: float  # examples drawn / distinct training examples
    length: dict[str, str]  # LengthStats summaries of train and validation
    initial_validation_loss: float | None  # before this run's first step
    final_validation_loss: float | None
    unigram_baseline: float | None  # validation tokens under the training tokens' unigram distribution
    last_train_loss: float | None  # the last logged step's
    evaluations: list[tuple[int, float]]
    train_seconds: float
    attribute_lines: AttributeLines | None = None  # what the model was trained to answer (None: plain SFT)


def check_rating_columns(conversation: Conversation, schema: AttributeSchema) -> None:
    """HelpSteer-style rows keep unknown columns as passthrough; a rating the schema lacks is an error (for the
    training stages that read labels through `attributes`: SFT and the APM)."""
    unknown = unschema_ratings(conversation, schema)
    if unknown:
        raise ConfigError(
            "attributes.attributes",
            list(schema.attributes),
            f"{conversation.source} rates {', '.join(unknown)}, which schema '{schema.name}' lacks "
            "(training would silently ignore those ratings)",
            "use a schema that names them (e.g. attributes=steerlm_oasst, or a custom "
            "attributes.attributes=[...]) or remove those columns from the data",
        )


def read_conversations(
    cfg: SFTConfig, path: str, schema: AttributeSchema, output_dir: Path, split: str
) -> list[Conversation]:
    """Every conversation of `path`, checked against the schema, with `sft.system_prompt` applied.

    With `data.on_bad_row=reject` bad rows go to `<output_dir>/rejects.<split>.jsonl`.
    """
    stats = ReadStats()
    reject = cfg.data.on_bad_row == BadRowPolicy.reject
    check_columns = DataFormat(cfg.data.format).has_rating_columns
    conversations = []
    with RejectSink(output_dir / f"rejects.{split}.jsonl") if reject else nullcontext() as rejects:
        for conversation in read_records(path, cfg.data.format, schema, cfg.data.on_bad_row, rejects, stats):
            if check_columns:
                check_rating_columns(conversation, schema)
            if cfg.sft.system_prompt is not None:
                conversation = replace(conversation, system=cfg.sft.system_prompt)
            conversations.append(conversation)
    log.info("%s: %d rows read, %d conversations, %d rejected", path, stats.rows_in, stats.rows_out, stats.rejected)
    return conversations


def sft_examples(
    conversations: Sequence[Conversation],
    template: SteerLMTemplate,
    tokenizer: Tokenizer,
    seq_length: int,
    cfg: SFTConfig,
    stats: LengthStats,
) -> list[Example]:
    """One example per conversation (every assistant turn in it), fitted to `seq_length` positions."""
    examples = (conversation_example(template, c, tokenizer) for c in conversations)
    return apply_length_policy(examples, seq_length, cfg.data.length_policy, stats)


def load_data(cfg: SFTConfig, schema: AttributeSchema, tokenizer: Tokenizer, output_dir: Path) -> SFTData:
    """Training and validation examples (`data.validation_file`, or `data.validation_fraction` held out)."""
    template = SteerLMTemplate(schema, cfg.sft.template(cfg.template.tokenization))
    records = read_conversations(cfg, cfg.data.train_file, schema, output_dir, "train")
    if cfg.data.validation_file is not None:
        train_records = records
        valid_records = read_conversations(cfg, cfg.data.validation_file, schema, output_dir, "validation")
    else:
        fraction = cfg.data.validation_fraction
        train_records = [r for r in records if not held_out(r.source, fraction)]
        valid_records = [r for r in records if held_out(r.source, fraction)]
    data = SFTData(train=[], valid=[], distinct_train=0)
    seq_length = cfg.trainer.seq_length
    train = sft_examples(train_records, template, tokenizer, seq_length, cfg, data.train_lengths)
    data.valid = sft_examples(valid_records, template, tokenizer, seq_length, cfg, data.valid_lengths)
    if not train:
        raise ConfigError(
            "data.train_file",
            cfg.data.train_file,
            f"gives no example with a trained token ({data.train_lengths.summary()})",
            "check the file, data.length_policy and trainer.seq_length",
        )
    data.distinct_train = len(train)
    data.train = train * cfg.sft.repeat
    if cfg.sft.condition_on_attributes:
        kept = {example.source for example in train}
        data.attribute_lines = attribute_lines((r for r in train_records if r.source in kept), schema)
    return data


def trained_targets(examples: Sequence[Example]) -> Counter:
    """Counts of the target ids the loss covers (a target is trained when its own flag is set)."""
    counts: Counter = Counter()
    for example in examples:
        counts.update(token for token, flag in zip(example.ids[1:], example.trainable[1:]) if flag)
    return counts


def unigram_cross_entropy(train: Sequence[Example], valid: Sequence[Example], vocab_size: int) -> float | None:
    """Cross entropy (nats per token) of the validation's trained tokens under the unigram distribution of
    the training's trained tokens, add-one smoothed over the tokenizer's vocabulary; None without validation.

    A model that ignores context entirely can reach this; an SFT model should fall well below it.
    """
    train_counts, valid_counts = trained_targets(train), trained_targets(valid)
    total_valid = sum(valid_counts.values())
    if not total_valid:
        return None
    denominator = sum(train_counts.values()) + vocab_size
    nats = -sum(count * math.log((train_counts[token] + 1) / denominator) for token, count in valid_counts.items())
    return nats / total_valid


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def step_batch(
    examples: Sequence[Example],
    pad_id: int,
    packing: bool,
    seq_length: int,
    rows_multiple: int,
    length_multiple: int = 1,
) -> Batch:
    """One step's global batch of `examples`, identical on every rank.

    Dynamic padding: one row per example, right-padded to the longest. Packing: the examples are packed
    first-fit-decreasing into rows of at most `seq_length` positions (documents isolated by the attention
    mask), and empty rows are added up to a multiple of `rows_multiple` (micro_batch_size x dp), so a step
    trains on the same tokens either way. Lengths are rounded up to `length_multiple` (sequence parallelism).
    """
    if not packing:
        length = _round_up(max(e.positions for e in examples), length_multiple)
        return pad_batch(examples, pad_id, length)
    rows = pack_examples(examples, seq_length)
    rows += [[] for _ in range(-len(rows) % rows_multiple)]
    length = _round_up(max(sum(e.positions for e in row) for row in rows), length_multiple)
    return packed_batch(rows, pad_id, length)


def validation_batches(valid: Sequence[Example], pad_id: int, rows: int, length_multiple: int = 1) -> list[Batch]:
    """Every validation example once, longest first, `rows` per batch; the last batch is filled with
    untrained blank rows so it splits like a training batch."""
    order = sorted(valid, key=lambda e: (-e.positions, e.source))
    blank = Example((pad_id, pad_id), (False, False))
    batches = []
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        chunk += [blank] * (rows - len(chunk))
        batches.append(pad_batch(chunk, pad_id, _round_up(chunk[0].positions, length_multiple)))
    return batches


def resolve_init_checkpoint(cfg: SFTConfig) -> InitSource | None:
    """The weights `sft.init_from` names (a steerlm run or checkpoint, or an HF Llama directory), shape-checked."""
    return resolve_init_source("sft.init_from", cfg.sft.init_from, cfg.model)


def check_resume_conditioning(cfg: SFTConfig, output_dir: Path) -> None:
    """A run's checkpoints were trained with one attribute conditioning: refuse to continue them with another."""
    path = latest_checkpoint(output_dir) if cfg.checkpoint.resume else None
    if path is None:
        return
    check_tokenization(path, cfg.template.tokenization, "resuming")
    saved = saved_config(path)
    trained_with = saved.get("sft", {}).get("condition_on_attributes")
    if trained_with is not None and trained_with != cfg.sft.condition_on_attributes:
        raise ConfigError(
            "sft.condition_on_attributes",
            cfg.sft.condition_on_attributes,
            f"checkpoint {path} was trained with sft.condition_on_attributes={trained_with}",
            "use the checkpoint's setting, a new output_dir, or checkpoint.resume=false",
        )
    if "attributes" in saved and list(saved.attributes.attributes) != list(cfg.attributes.attributes):
        raise ConfigError(
            "attributes.attributes",
            list(cfg.attributes.attributes),
            f"checkpoint {path} was trained for the attributes {list(saved.attributes.attributes)}",
            "use the checkpoint's schema, a new output_dir, or checkpoint.resume=false",
        )


class SFTStage(TrainingStage[SFTConfig, "SFTInputs"]):
    """Stage 3 on the one runner: SteerLM-template examples, the language-model task, validation loss."""

    def prepare(self, cfg: SFTConfig, output_dir: Path) -> InitSource | None:
        check_resume_conditioning(cfg, output_dir)
        return check_init_tokenization(resolve_init_checkpoint(cfg), cfg.template.tokenization)

    def load_data(self, cfg: SFTConfig, output_dir: Path) -> SFTInputs:
        schema = cfg.attributes.schema()
        tokenizer = load_tokenizer(
            cfg.tokenizer.type.value, cfg.tokenizer.path, cfg.template.tokenization.markers_are_tokens
        )
        validate_vocab(cfg.model, tokenizer.vocab_size, cfg.tokenizer.path)
        data = load_data(cfg, schema, tokenizer, output_dir)
        baseline = unigram_cross_entropy(data.train[: data.distinct_train], data.valid, tokenizer.vocab_size)
        log.info(
            "SFT data (%s attributes): train %s; validation %s; repeat %d → %d rows per epoch",
            "with" if cfg.sft.condition_on_attributes else "WITHOUT",
            data.train_lengths.summary(),
            data.valid_lengths.summary(),
            cfg.sft.repeat,
            len(data.train),
        )
        return SFTInputs(data, tokenizer.pad_id, baseline)

    def batches(self, ctx: StageContext[SFTConfig], inputs: SFTInputs) -> StageData:
        cfg, layout, data = ctx.cfg, ctx.layout, inputs.data
        trainer = cfg.trainer
        multiple = length_multiple(layout)
        rows_multiple = trainer.micro_batch_size * layout.dp

        def step_examples(step: int) -> list[Example]:
            indices = global_batch_indices(len(data.train), trainer.global_batch_size, step, trainer.seed)
            examples = [data.train[i] for i in indices]
            if cfg.sft.packing:
                return examples
            order = length_sorted_order([e.positions for e in examples], trainer.micro_batch_size, layout.dp)
            return [examples[i] for i in order]

        def train_batch(step: int) -> Batch:
            return step_batch(
                step_examples(step),
                inputs.pad_id,
                cfg.sft.packing,
                trainer.seq_length,
                rows_multiple,
                multiple,
            )

        if cfg.sft.packing:
            rows, length = train_batch(ctx.start_step + 1)["tokens"].shape
            used = sum(example.positions for example in step_examples(ctx.start_step + 1))
            log.info(
                "packing: step %d's %d conversations fill %d rows of %d positions (%.0f%% used)",
                ctx.start_step + 1,
                trainer.global_batch_size,
                rows,
                length,
                100 * used / (rows * length),
            )
        valid = validation_batches(data.valid, inputs.pad_id, trainer.global_batch_size, multiple)
        if not valid:
            log.warning(
                "no validation examples (data.validation_fraction=0 and no data.validation_file): "
                "eval.json will have no validation loss"
            )
        return StageData(train_batch, valid)

    def before_training(self, ctx: StageContext[SFTConfig], inputs: SFTInputs, stage_data: StageData):
        lines = inputs.data.attribute_lines
        if lines is not None and ctx.layout.is_rank_zero:  # before the first checkpoint, so any can be served
            write_attribute_lines(ctx.output_dir, lines)
        valid = stage_data.valid_batches
        initial = evaluate(ctx.setup.model, valid, ctx.cfg.trainer.micro_batch_size, ctx.layout) if valid else None
        if initial is not None:
            log.info("step %d validation loss %.4f (unigram baseline %.4f)", ctx.start_step, initial, inputs.baseline)
        return initial, valid, time.perf_counter()

    def report(self, ctx: StageContext[SFTConfig], inputs: SFTInputs, outcome: TrainingOutcome, before) -> SFTResult:
        initial, valid, began = before
        cfg, data = ctx.cfg, inputs.data
        trainer = cfg.trainer
        seconds = time.perf_counter() - began
        final = None
        if valid:
            at_end = [loss for step, loss in outcome.evaluations if step == outcome.last_step]
            final = at_end[0] if at_end else evaluate(ctx.setup.model, valid, trainer.micro_batch_size, ctx.layout)
            log.info(
                "validation loss %.4f (at start %.4f, unigram baseline %.4f) after %d steps in %.0f s",
                final,
                initial,
                inputs.baseline,
                outcome.last_step,
                seconds,
            )
        drawn = outcome.last_step * trainer.global_batch_size
        return SFTResult(
            layout=ctx.layout.describe(),
            condition_on_attributes=cfg.sft.condition_on_attributes,
            packing=cfg.sft.packing,
            init_from=cfg.sft.init_from,
            start_step=ctx.start_step,
            last_step=outcome.last_step,
            stop_reason=outcome.stop_reason,
            train_examples=data.distinct_train,
            repeat=cfg.sft.repeat,
            validation_examples=len(data.valid),
            train_tokens=sum(trained_targets(data.train[: data.distinct_train]).values()),
            validation_tokens=sum(trained_targets(data.valid).values()),
            epochs=drawn / data.distinct_train,
            length={"train": data.train_lengths.summary(), "validation": data.valid_lengths.summary()},
            initial_validation_loss=initial,
            final_validation_loss=final,
            unigram_baseline=inputs.baseline,
            last_train_loss=outcome.history[-1].loss if outcome.history else None,
            evaluations=outcome.evaluations,
            train_seconds=seconds,
            attribute_lines=data.attribute_lines,
        )


def run(cfg: SFTConfig) -> SFTResult:
    """Validate, read and tokenise (every data problem surfaces here, before training), train, evaluate."""
    return run_stage(SFTStage(), cfg)
