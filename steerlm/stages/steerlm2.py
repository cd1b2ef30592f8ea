"""SteerLM 2.0 (`recipes/train_sft.py sft.objective=steerlm2`): attribute-conditioned SFT's model trained
toward P(y|a,x) ∝ P(a|x,y) P(y|x) on responses sampled from it (docs/steerlm2.md).

config → rows of `recipes/prepare_steerlm2.py` (`steerlm.data.steerlm2`) → one group of n responses per
prompt → the one training loop with the `STEERLM2` task (a no-grad baseline pass, then the weighted loss)
→ `eval.json` with the validation loss and distance KL(w || b) before and after. The global batch counts
prompts; a micro-batch holds `micro_batch_size` prompts' responses; data parallelism splits prompts.
Initialisation, resume and the SFT config are stage 3's (`steerlm.stages.sft`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from steerlm.checkpoint.sharded import latest_checkpoint, saved_config
from steerlm.config import ConfigError, validate_vocab
from steerlm.config.sft import SFTConfig, SFTObjective
from steerlm.data.attribute_lines import AttributeLines, count_lines, write_attribute_lines
from steerlm.data.attributes import AttributeSchema
from steerlm.data.lengths import LengthStats
from steerlm.data.readers import BadRowPolicy, ReadStats, RejectSink
from steerlm.data.sampler import global_batch_indices, held_out
from steerlm.data.steerlm2 import (
    ResponseGroup,
    SteerLM2Row,
    group_batch,
    read_steerlm2_rows,
    response_groups,
    validation_group_batches,
)
from steerlm.data.template import SteerLMTemplate
from steerlm.stages.runner import StageContext, StageData, TrainingStage, run_stage
from steerlm.stages.sft import check_resume_conditioning, resolve_init_checkpoint
from steerlm.tokenizers import Tokenizer, load_tokenizer
from steerlm.training import STEERLM2, Task
from steerlm.training.batching import length_multiple
from steerlm.training.init_from import InitSource, check_init_tokenization
from steerlm.training.loop import TrainingOutcome, evaluate_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteerLM2Result:
    layout: str
    init_from: str | None
    start_step: int
    last_step: int
    stop_reason: str | None
    responses_per_prompt: int
    train_prompts: int  # after the length check
    validation_prompts: int
    length: dict[str, str]  # LengthStats summaries (a prompt is dropped whole)
    initial_validation: dict[str, float] | None  # {"loss", "distance"} before this run's first step
    final_validation: dict[str, float] | None
    last_train: dict[str, float] | None  # the last logged step's loss and distance
    evaluations: list[tuple[int, float]]
    train_seconds: float
    attribute_lines: AttributeLines | None = None  # one per trained response (every response carries its row's)


def _check_resume_objective(cfg: SFTConfig, output_dir: Path) -> None:
    """A run's checkpoints continue only under the objective they were trained with (sft.init_from starts
    SteerLM 2.0 from a stage-3 model)."""
    path = latest_checkpoint(output_dir) if cfg.checkpoint.resume else None
    trained = saved_config(path).get("sft", {}).get("objective", SFTObjective.sft.value) if path else None
    if trained is not None and trained != SFTObjective.steerlm2.value:
        raise ConfigError(
            "sft.objective",
            SFTObjective.steerlm2.value,
            f"checkpoint {path} was trained with sft.objective={trained}",
            "start SteerLM 2.0 in a new output_dir with sft.init_from=<that run>, or checkpoint.resume=false",
        )


def read_rows(cfg: SFTConfig, path: str, schema: AttributeSchema, output_dir: Path, split: str) -> list[SteerLM2Row]:
    """Every row of `path` (`data.on_bad_row=reject`: bad rows go to `<output_dir>/rejects.<split>.jsonl`)."""
    stats = ReadStats()
    reject = cfg.data.on_bad_row == BadRowPolicy.reject
    with RejectSink(output_dir / f"rejects.{split}.jsonl") if reject else nullcontext() as rejects:
        rows = list(read_steerlm2_rows(path, schema, cfg.data.on_bad_row, rejects, stats))
    log.info("%s: %d SteerLM 2.0 rows, %d rejected", path, stats.rows_out, stats.rejected)
    return rows


def load_groups(
    cfg: SFTConfig, template: SteerLMTemplate, tokenizer: Tokenizer, output_dir: Path
) -> tuple[list[ResponseGroup], list[ResponseGroup], dict[str, str], AttributeLines | None]:
    """Training and validation groups (`data.validation_file`, or `data.validation_fraction` held out by
    each row's file:line), with their length summaries and the attribute lines of the training responses (None
    without attribute conditioning). `data.format` is not read: the files are rows."""
    schema = template.schema
    rows = read_rows(cfg, cfg.data.train_file, schema, output_dir, "train")
    if cfg.data.validation_file is not None:
        train_rows, valid_rows = rows, read_rows(cfg, cfg.data.validation_file, schema, output_dir, "validation")
    else:
        train_rows = [r for r in rows if not held_out(r.source, cfg.data.validation_fraction)]
        valid_rows = [r for r in rows if held_out(r.source, cfg.data.validation_fraction)]
    lengths = {"train": LengthStats(), "validation": LengthStats()}
    seq_length = cfg.trainer.seq_length
    train = response_groups(train_rows, template, tokenizer, seq_length, lengths["train"])
    valid = response_groups(valid_rows, template, tokenizer, seq_length, lengths["validation"])
    sizes = {group.size for group in train + valid}
    if not train or len(sizes) != 1:
        raise ConfigError(
            "data.train_file",
            cfg.data.train_file,
            f"gives {len(train)} training prompts with response counts {sorted(sizes)} ({lengths['train'].summary()})",
            "give rows with one number of responses per prompt (and data.validation_file likewise) that fit "
            "trainer.seq_length",
        )
    kept = {group.source for group in train}
    trained = (
        count_lines(
            (r.labels for r in train_rows if r.source in kept and r.labels is not None for _ in r.responses), schema
        )
        if template.config.condition_on_attributes
        else None
    )
    return train * cfg.sft.repeat, valid, {split: stats.summary() for split, stats in lengths.items()}, trained


@dataclass(frozen=True)
class SteerLM2Inputs:
    train: list[ResponseGroup]
    valid: list[ResponseGroup]
    lengths: dict[str, str]
    pad_id: int
    attribute_lines: AttributeLines | None


class SteerLM2Stage(TrainingStage[SFTConfig, SteerLM2Inputs]):
    """SteerLM 2.0 on the one runner: response groups, the STEERLM2 task, loss and distance before and after."""

    def prepare(self, cfg: SFTConfig, output_dir: Path) -> InitSource | None:
        _check_resume_objective(cfg, output_dir)
        check_resume_conditioning(cfg, output_dir)
        return check_init_tokenization(resolve_init_checkpoint(cfg), cfg.template.tokenization)

    def load_data(self, cfg: SFTConfig, output_dir: Path) -> SteerLM2Inputs:
        tokenization = cfg.template.tokenization
        tokenizer = load_tokenizer(cfg.tokenizer.type.value, cfg.tokenizer.path, tokenization.markers_are_tokens)
        validate_vocab(cfg.model, tokenizer.vocab_size, cfg.tokenizer.path)
        template = SteerLMTemplate(cfg.attributes.schema(), cfg.sft.template(tokenization))
        train, valid, lengths, trained = load_groups(cfg, template, tokenizer, output_dir)
        return SteerLM2Inputs(train, valid, lengths, tokenizer.pad_id, trained)

    def task(self, cfg: SFTConfig) -> Task:
        return STEERLM2

    def batches(self, ctx: StageContext[SFTConfig], inputs: SteerLM2Inputs) -> StageData:
        trainer, train = ctx.cfg.trainer, inputs.train
        multiple = length_multiple(ctx.layout)

        def train_batch(step: int):
            indices = global_batch_indices(len(train), trainer.global_batch_size, step, trainer.seed)
            return group_batch([train[i] for i in indices], inputs.pad_id, multiple)

        valid = validation_group_batches(inputs.valid, inputs.pad_id, trainer.global_batch_size, multiple)
        return StageData(train_batch, valid, group_size=train[0].size)

    def _validation(self, ctx: StageContext[SFTConfig], stage_data: StageData) -> dict[str, float] | None:
        if not stage_data.valid_batches:
            return None
        rows = ctx.cfg.trainer.micro_batch_size * stage_data.group_size
        loss, metrics = evaluate_metrics(ctx.setup.model, stage_data.valid_batches, rows, ctx.layout, STEERLM2)
        return {"loss": loss, **metrics}

    def before_training(self, ctx: StageContext[SFTConfig], inputs: SteerLM2Inputs, stage_data: StageData):
        if inputs.attribute_lines is not None and ctx.layout.is_rank_zero:
            write_attribute_lines(ctx.output_dir, inputs.attribute_lines)
        initial = self._validation(ctx, stage_data)
        log.info(
            "SteerLM 2.0: %d prompts x %d responses; validation at step %d: %s",
            len(inputs.train),
            stage_data.group_size,
            ctx.start_step,
            initial,
        )
        return initial, stage_data, time.perf_counter()

    def report(
        self, ctx: StageContext[SFTConfig], inputs: SteerLM2Inputs, outcome: TrainingOutcome, before
    ) -> SteerLM2Result:
        initial, stage_data, began = before
        seconds = time.perf_counter() - began
        final = self._validation(ctx, stage_data)
        log.info("SteerLM 2.0 validation after step %d: %s (at start %s)", outcome.last_step, final, initial)
        last = outcome.history[-1] if outcome.history else None
        return SteerLM2Result(
            layout=ctx.layout.describe(),
            init_from=ctx.cfg.sft.init_from,
            start_step=ctx.start_step,
            last_step=outcome.last_step,
            stop_reason=outcome.stop_reason,
            responses_per_prompt=stage_data.group_size,
            train_prompts=len(inputs.train) // ctx.cfg.sft.repeat,
            validation_prompts=len(inputs.valid),
            length=inputs.lengths,
            initial_validation=initial,
            final_validation=final,
            last_train=None if last is None else {"loss": last.loss, **last.metrics},
            evaluations=outcome.evaluations,
            train_seconds=seconds,
            attribute_lines=inputs.attribute_lines,
        )


def run(cfg: SFTConfig) -> SteerLM2Result:
    """Validate, read and tokenise the rows, train with the SteerLM 2.0 task, evaluate; writes eval.json."""
    return run_stage(SteerLM2Stage(), cfg)
