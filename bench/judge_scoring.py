"""The Bayes judge's two scorings side by side on the same turns: every variant run whole through megatron's
forward (`whole`) vs each turn's shared prefix computed once (`shared_prefix`, the default where the lean
decoder runs the model), in alternating rounds in one process; prints the median seconds per round of each,
turns/s, their ratio, and the largest difference of the posteriors.

    python bench/judge_scoring.py --judge runs/knowledge/judge --input runs/knowledge/data/unlabelled.jsonl \\
        --attributes correctness,helpfulness --turns 400 --rounds 3

The turns are the last response of the first `--turns` conversations, the other attributes at their labels
(the schema's defaults where a conversation has none), as annotation judges them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from steerlm import runtime
from steerlm.config import ParallelConfig
from steerlm.data.readers import DataFormat, read_records
from steerlm.inference.judge import BayesJudge, JudgedTurn
from steerlm.inference.loading import read_checkpoint_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", required=True, help="a recipes/train_sft.py run dir or checkpoint")
    parser.add_argument("--input", required=True, help="conversation JSONL")
    parser.add_argument("--attributes", default="correctness,helpfulness")
    parser.add_argument("--turns", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    args = parser.parse_args()

    layout = runtime.initialize(ParallelConfig(), seed=0)
    try:
        attributes = args.attributes.split(",")
        shared = BayesJudge.from_checkpoint(
            args.judge,
            layout,
            attributes,
            read_checkpoint_setup(args.judge, "--judge").schema,
            micro_batch_size=args.micro_batch_size,
        )
        whole = BayesJudge(shared.loaded, attributes, layout, args.micro_batch_size, shared_prefix=False)
        schema = shared.loaded.schema
        turns = []
        for record in list(read_records(args.input, DataFormat.conversation, schema))[: args.turns]:
            labels = {**schema.default_labels, **(record.turns[-1].labels or {})}
            given = {name: value for name, value in labels.items() if value is not None}
            turns.append(JudgedTurn(record.system, record.turns[:-1], record.turns[-1].text, given, record.source))
        times: dict[str, list[float]] = {"whole": [], "shared_prefix": []}
        results = {}
        for _ in range(args.rounds):
            for name, judge in (("whole", whole), ("shared_prefix", shared)):
                start = time.perf_counter()
                results[name] = judge.posteriors(turns)
                times[name].append(time.perf_counter() - start)
        print(f"{len(turns)} turns x {len(attributes)} attributes x {len(shared.levels)} levels, {args.rounds} rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:14s} {median:7.2f} s/round  {len(turns) / median:7.1f} turns/s")
        ratio = statistics.median(times["whole"]) / statistics.median(times["shared_prefix"])
        print(f"  ratio shared_prefix / whole (throughput): {ratio:.2f}")
        print(f"  largest posterior difference: {np.abs(results['whole'] - results['shared_prefix']).max():.2e}")
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
