"""A LoRA run's checkpoints, side by side: `lora.checkpoint=full` (the frozen weights saved with the adapters) vs
`adapters` (the adapters and their Adam state alone, the base read from the run's init_from), on one preset, one
process. Each round saves a checkpoint of each kind (checksums included, as `checkpoint.verify` does) and resumes
from it (for `adapters`, reading the base first, its fingerprint checked); the medians, the bytes on disk and the
ratios are printed.

    python bench/lora_checkpoint.py --preset small --lora-rank 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, load_checkpoint, save_checkpoint
from steerlm.config import DType, LoraConfig, ParallelConfig, PrecisionConfig, TrainConfig, compose, to_typed
from steerlm.models import build_model_chunks
from steerlm.training import build_training
from steerlm.training.init_from import resolve_init_source, resume_or_initialise

KINDS = ("full", "adapters")


def _bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())


def measure(preset: str, rank: int, dtype: DType, rounds: int, scratch: Path) -> dict:
    model = to_typed(compose("demo", [f"model={preset}"])).model
    precision = PrecisionConfig(dtype=dtype)
    layout = runtime.initialize(ParallelConfig(), seed=1)
    try:
        base = build_model_chunks(model, precision, layout, 1)
        save_checkpoint(scratch / "base", 0, WeightsOnly(base), layout, TrainConfig(model=model, precision=precision))
        del base
        cfg = TrainConfig(model=model, precision=precision, lora=LoraConfig(rank=rank, alpha=2.0 * rank))
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, keep_last=1))
        setup = build_training(cfg, layout)
        init = resolve_init_source("pretrain.init_from", str(scratch / "base"), model)
        resume_or_initialise(cfg, scratch / "run", setup, layout, init)
        for chunk in setup.model:
            chunk.zero_grad_buffer()
        setup.optimizer.step()  # Adam's state exists, as in any checkpoint after a step
        base_weights = setup.base
        times: dict[str, dict[str, list[float]]] = {kind: {"save": [], "resume": []} for kind in KINDS}
        sizes: dict[str, int] = {}
        for index in range(1, rounds + 1):
            for kind in KINDS:
                setup.base = base_weights if kind == "adapters" else None
                start = time.perf_counter()
                path = save_checkpoint(scratch / kind, index, setup, layout, cfg)
                times[kind]["save"].append(time.perf_counter() - start)
                sizes[kind] = _bytes(path)
                start = time.perf_counter()
                load_checkpoint(path, setup.model, setup.optimizer, setup.scheduler, layout, model)
                times[kind]["resume"].append(time.perf_counter() - start)
    finally:
        runtime.shutdown()
    return {
        "preset": preset,
        "parameters": model.num_parameters(),
        "lora_rank": rank,
        "dtype": dtype.value,
        "rounds": rounds,
        **{
            kind: {
                "bytes": sizes[kind],
                "save_s": statistics.median(times[kind]["save"]),
                "resume_s": statistics.median(times[kind]["resume"]),
            }
            for kind in KINDS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lora_checkpoint_"))
    try:
        result = measure(args.preset, args.lora_rank, DType(args.dtype), args.rounds, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{args.preset} ({result['parameters'] / 1e6:.1f}M parameters), LoRA rank {args.lora_rank}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print(f"{'lora.checkpoint':<16}{'bytes':>14}{'save s':>10}{'resume s':>10}")
    for kind in KINDS:
        row = result[kind]
        print(f"{kind:<16}{row['bytes']:>14,}{row['save_s']:>10.3f}{row['resume_s']:>10.3f}")
    full, alone = result["full"], result["adapters"]
    print(
        f"ratio adapters / full: bytes {alone['bytes'] / full['bytes']:.4f}, "
        f"save {alone['save_s'] / full['save_s']:.2f}, resume {alone['resume_s'] / full['resume_s']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
