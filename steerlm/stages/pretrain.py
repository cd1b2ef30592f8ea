"""Stage 0: a language model pretrained on plain text — the base every SteerLM stage starts from.

`recipes/pretrain.py` trains it on a JSONL file of documents with a tokenizer (the synthetic world's
`corpus.jsonl`: encyclopedia paragraphs and conversation text, so the base LM knows the world's facts);
`recipes/demo.py` (the smoke test) on the bundled demo text as bytes. Both report whether the model
learned: validation loss before and after against the unigram baseline, and weight digests (equal at every
TP/PP/DP layout for one seed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from steerlm.config import TrainConfig, validate_vocab
from steerlm.config.pretrain import PretrainConfig
from steerlm.data.text import BYTE_VOCAB, TokenCorpus, demo_text
from steerlm.errors import ConfigError
from steerlm.models.sharding import weights_digest
from steerlm.stages.runner import StageContext, StageData, TrainingStage, run_stage
from steerlm.tokenizers import load_tokenizer
from steerlm.training.init_from import InitSource, resolve_init_source
from steerlm.training.loop import TrainingOutcome, evaluate
from steerlm.training.metrics import LoggedStep

log = logging.getLogger(__name__)
VALID_BATCHES = 4


@dataclass(frozen=True)
class TextLMResult:
    layout: str
    start_step: int
    last_step: int
    stop_reason: str | None
    train_tokens: int
    validation_tokens: int
    initial_weights_sha256: str  # before this run's first step (after resuming, if it resumed)
    initial_valid_loss: float
    final_valid_loss: float
    unigram_baseline: float
    weights_sha256: str
    history: list[LoggedStep]
    evaluations: list[tuple[int, float]]


class TextLMStage(TrainingStage[TrainConfig, TokenCorpus]):
    def prepare(self, cfg: TrainConfig, output_dir: Path) -> InitSource | None:
        if isinstance(cfg, PretrainConfig):
            return resolve_init_source("pretrain.init_from", cfg.pretrain.init_from, cfg.model)
        if cfg.model.vocab_size < BYTE_VOCAB:
            raise ConfigError(
                "model.vocab_size",
                cfg.model.vocab_size,
                f"byte-level text needs {BYTE_VOCAB} token ids",
                f"use model.vocab_size>={BYTE_VOCAB}",
            )
        return None

    def load_data(self, cfg: TrainConfig, output_dir: Path) -> TokenCorpus:
        if not isinstance(cfg, PretrainConfig):
            return TokenCorpus.from_bytes(demo_text())
        tokenizer = load_tokenizer(cfg.tokenizer.type.value, cfg.tokenizer.path)
        validate_vocab(cfg.model, tokenizer.vocab_size, cfg.tokenizer.path)
        corpus = TokenCorpus.from_jsonl(cfg.data.train_file, tokenizer, cfg.data.validation_fraction, cfg.data.key)
        log.info(
            "%s: %d training and %d validation tokens",
            cfg.data.train_file,
            corpus.tokens("train"),
            corpus.tokens("valid"),
        )
        return corpus

    def batches(self, ctx: StageContext[TrainConfig], data: TokenCorpus) -> StageData:
        trainer = ctx.cfg.trainer
        rows, length, seed = trainer.global_batch_size, trainer.seq_length, trainer.seed
        valid = (
            [data.batch("valid", i, rows, length, seed) for i in range(VALID_BATCHES)]
            if data.tokens("valid") > length + 1
            else []
        )
        return StageData(lambda step: data.batch("train", step, rows, length, seed), valid)

    def before_training(self, ctx: StageContext[TrainConfig], data: TokenCorpus, stage_data: StageData):
        initial = evaluate(ctx.setup.model, stage_data.valid_batches, ctx.cfg.trainer.micro_batch_size, ctx.layout)
        digest = weights_digest(ctx.setup.chunks, ctx.layout.pg_collection.tp)
        log.info(
            "%s | %s | step %d | validation loss %.4f",
            ctx.cfg.model.name,
            ctx.layout.describe(),
            ctx.start_step,
            initial,
        )
        return initial, digest, stage_data.valid_batches

    def report(
        self, ctx: StageContext[TrainConfig], data: TokenCorpus, outcome: TrainingOutcome, before
    ) -> TextLMResult:
        initial, digest, valid = before
        final = evaluate(ctx.setup.model, valid, ctx.cfg.trainer.micro_batch_size, ctx.layout)
        result = TextLMResult(
            layout=ctx.layout.describe(),
            start_step=ctx.start_step,
            last_step=outcome.last_step,
            stop_reason=outcome.stop_reason,
            train_tokens=data.tokens("train"),
            validation_tokens=data.tokens("valid"),
            initial_weights_sha256=digest,
            initial_valid_loss=initial,
            final_valid_loss=final,
            unigram_baseline=data.unigram_entropy("valid"),
            weights_sha256=weights_digest(ctx.setup.chunks, ctx.layout.pg_collection.tp),
            history=outcome.history,
            evaluations=outcome.evaluations,
        )
        log.info("validation loss %.4f (at start %.4f, unigram baseline %.4f)", final, initial, result.unigram_baseline)
        return result


def run(cfg: TrainConfig) -> TextLMResult:
    """Pretrain (a `PretrainConfig`) or the smoke demo (a plain `TrainConfig`); writes summary.json."""
    return run_stage(TextLMStage(), cfg, result_file="summary.json")
