"""Annotation throughput at DP=1 and DP=2, side by side, and their ratio.

    python recipes/prepare_data.py data=synthetic && python recipes/train_attribute_model.py
    python bench/annotate_scaling.py --apm runs/apm --input data/synthetic/unlabelled.jsonl --rows 4000

Each run is `recipes/annotate.py` (DP=2 under torchrun, one torch thread per rank in both runs) on the
first `--rows` rows; rows/s is the stage's own figure (reading, scoring and writing; process start-up
and model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def annotate(apm: str, source: Path, output: Path, ranks: int, threads: int) -> dict:
    launcher = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    )
    command = [
        *launcher,
        str(ROOT / "recipes" / "annotate.py"),
        f"apm_checkpoint={apm}",
        f"input={source}",
        f"output={output}",
        f"torch_threads={threads}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(Path(f"{output}.summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apm", default="runs/apm")
    parser.add_argument("--input", default="data/synthetic/unlabelled.jsonl")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "input.jsonl"
        with open(args.input, encoding="utf-8") as lines:
            source.write_text("".join(line for _, line in zip(range(args.rows), lines)), encoding="utf-8")
        results = {
            ranks: annotate(args.apm, source, Path(tmp) / f"dp{ranks}.jsonl", ranks, args.threads) for ranks in (1, 2)
        }
        identical = (Path(tmp) / "dp1.jsonl").read_bytes() == (Path(tmp) / "dp2.jsonl").read_bytes()
    print(f"annotation of {args.rows} rows, {args.threads} torch thread(s) per rank")
    for ranks, summary in results.items():
        print(f"  DP={ranks}: {summary['rows_per_s']:8.1f} rows/s ({summary['seconds']:.1f} s)")
    print(
        f"  ratio DP=2 / DP=1: {results[2]['rows_per_s'] / results[1]['rows_per_s']:.2f}"
        f"  (outputs byte-identical: {identical})"
    )


if __name__ == "__main__":
    main()
