"""SFT step time, side by side: each micro-batch padded to the step's longest conversation (steerlm before
2026-12-01) vs the step's conversations ordered by length and each micro-batch cut to its own longest
(`steerlm.training.batching`), on the same steps of the same data, alternating in one process.

    python recipes/prepare_data.py data=synthetic                       # data/synthetic, once
    python bench/sft_padding.py --steps 20                              # the shipped SFT recipe's shapes
    python bench/sft_padding.py data.train_file=… tokenizer.path=… --steps 20

Prints the positions each variant computes per step and the median step time of each, and their ratios. Extra
arguments are `train_sft` overrides (model, batch sizes, data).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from steerlm import runtime
from steerlm.config import compose, to_typed
from steerlm.config.sft import SFTConfig
from steerlm.data.collate import Batch, pad_batch
from steerlm.data.sampler import global_batch_indices
from steerlm.models import build_model_chunks
from steerlm.stages.sft import load_data
from steerlm.tokenizers import load_tokenizer
from steerlm.training import build_optimizer, microbatches_for_rank, train_step, wrap_for_training
from steerlm.training.batching import length_sorted_order


def sliced(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """The former split: every micro-batch keeps the global batch's length."""
    rows = batch["tokens"].shape[0]
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, rows, micro_batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = to_typed(compose("train_sft", ["checkpoint.save_interval=null", *args.overrides]), SFTConfig)
    trainer = cfg.trainer
    layout = runtime.initialize(cfg.parallel, seed=trainer.seed)
    tokenizer = load_tokenizer(cfg.tokenizer.type.value, cfg.tokenizer.path)
    with tempfile.TemporaryDirectory() as scratch:  # where rejected rows would be written
        data = load_data(cfg, cfg.attributes.schema(), tokenizer, Path(scratch))
    pad = tokenizer.pad_id

    def build():
        chunks = build_model_chunks(cfg.model, cfg.precision, layout, seed=1)
        wrapped = wrap_for_training(chunks, cfg.precision, False, layout)
        optimizer, scheduler = build_optimizer(wrapped, cfg.optim, cfg.precision, trainer, False, layout)
        return wrapped, optimizer, scheduler

    variants = {"padded to the step's longest": build(), "sorted, cut per micro-batch": build()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    positions: dict[str, int] = dict.fromkeys(variants, 0)
    for step in range(1, args.steps + 1):
        indices = global_batch_indices(len(data.train), trainer.global_batch_size, step, trainer.seed)
        examples = [data.train[i] for i in indices]
        order = length_sorted_order([e.positions for e in examples], trainer.micro_batch_size, layout.dp)
        batches = {
            "padded to the step's longest": sliced(pad_batch(examples, pad), trainer.micro_batch_size),
            "sorted, cut per micro-batch": microbatches_for_rank(
                pad_batch([examples[i] for i in order], pad), trainer.micro_batch_size, layout
            ),
        }
        for name, (model, optimizer, scheduler) in variants.items():
            positions[name] += sum(b["tokens"].numel() for b in batches[name])
            began = time.perf_counter()
            train_step(model, optimizer, scheduler, batches[name], layout)
            if step > 1:  # the first step warms allocators up
                times[name].append(time.perf_counter() - began)
    runtime.shutdown()
    (old, new) = variants
    print(f"{args.steps} SFT steps, global batch {trainer.global_batch_size}, micro-batch {trainer.micro_batch_size}")
    for name in variants:
        print(
            f"  {name:30s} {positions[name] / args.steps:8.0f} positions/step "
            f"{statistics.median(times[name]) * 1e3:8.1f} ms/step (median)"
        )
    print(
        f"  positions new/old {positions[new] / positions[old]:.3f}; "
        f"speed-up old/new {statistics.median(times[old]) / statistics.median(times[new]):.3f}"
    )


if __name__ == "__main__":
    main()
