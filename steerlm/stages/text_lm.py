"""Train a language model from scratch on the bundled text: the foundation demo and smoke test.

Exercises the whole stack (config → layout → megatron model → DDP/optimizer → loop) at any TP/PP/DP
layout and reports whether the model learned: validation loss before and after training against the
byte-unigram baseline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch

from steerlm import runtime
from steerlm.config import ConfigError, TrainConfig, save_resolved, validate_train_config
from steerlm.data.text import BYTE_VOCAB, ByteCorpus, demo_text
from steerlm.models.sharding import weights_digest
from steerlm.training import build_training
from steerlm.training.loop import evaluate, maybe_resume, prepare_output_dir, run_training
from steerlm.training.metrics import LoggedStep

log = logging.getLogger(__name__)
VALID_BATCHES = 4


@dataclass(frozen=True)
class TextLMResult:
    layout: str
    start_step: int
    last_step: int
    stop_reason: str | None
    initial_weights_sha256: str  # before this run's first step (after resuming, if it resumed)
    initial_valid_loss: float
    final_valid_loss: float
    unigram_baseline: float
    weights_sha256: str
    history: list[LoggedStep]
    evaluations: list[tuple[int, float]]


def run(cfg: TrainConfig) -> TextLMResult:
    validate_train_config(cfg, runtime.launch_world_size(), runtime.detect_accelerator())
    if cfg.model.vocab_size < BYTE_VOCAB:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"byte-level text needs {BYTE_VOCAB} token ids",
            f"use model.vocab_size>={BYTE_VOCAB}",
        )
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    output_dir = prepare_output_dir(cfg.output_dir)
    layout = runtime.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        if layout.is_rank_zero:
            save_resolved(cfg, output_dir / "config.yaml")
        setup = build_training(cfg, layout)
        chunks, model = setup.chunks, setup.model
        start = maybe_resume(cfg, output_dir, setup, layout)
        trainer = cfg.trainer
        corpus = ByteCorpus(demo_text())
        valid = [
            corpus.batch("valid", i, trainer.global_batch_size, trainer.seq_length, trainer.seed)
            for i in range(VALID_BATCHES)
        ]
        initial = evaluate(model, valid, trainer.micro_batch_size, layout)
        initial_digest = weights_digest(chunks, layout.pg_collection.tp)
        log.info("%s | %s | step %d | validation loss %.4f", cfg.model.name, layout.describe(), start, initial)
        outcome = run_training(
            setup,
            layout,
            cfg,
            output_dir,
            lambda step: corpus.batch("train", step, trainer.global_batch_size, trainer.seq_length, trainer.seed),
            start_step=start,
            valid_batches=lambda: valid,
        )
        result = TextLMResult(
            layout=layout.describe(),
            start_step=start,
            last_step=outcome.last_step,
            stop_reason=outcome.stop_reason,
            initial_weights_sha256=initial_digest,
            initial_valid_loss=initial,
            final_valid_loss=evaluate(model, valid, trainer.micro_batch_size, layout),
            unigram_baseline=corpus.unigram_entropy("valid"),
            weights_sha256=weights_digest(chunks, layout.pg_collection.tp),
            history=outcome.history,
            evaluations=outcome.evaluations,
        )
        log.info(
            "validation loss %.4f (at start %.4f, byte-unigram baseline %.4f)",
            result.final_valid_loss,
            result.initial_valid_loss,
            result.unigram_baseline,
        )
        if layout.is_rank_zero:
            (output_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result
    finally:
        runtime.shutdown()
