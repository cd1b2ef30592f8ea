"""What a scheduled checkpoint costs the training loop, side by side: no checkpoint, a synchronous save and
`checkpoint.async_save`, each a run of the pretraining recipe (the demo's, on a model preset) with the same steps,
alternated in rounds so all three see the same load.

    python bench/async_checkpoint.py --preset small --steps 9 --interval 3 --rounds 2     # CPU
    python bench/async_checkpoint.py --preset small --steps 9 --interval 3 --rounds 1 --json out.json   # GPU

Per mode: the loop's time to the last step (metrics.jsonl's `elapsed` at step `--steps`, logged before the last
step's save, so every scheduled save and its aftermath is inside it), the cost per scheduled save against the
run without checkpoints, and how long each save held the loop (the recipe's "written in" / "started in" lines).
The medians over rounds and the ratios are printed; `--json` also writes them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"none": [], "sync": ["checkpoint.async_save=false"], "async": ["checkpoint.async_save=true"]}
HELD = re.compile(r"step (\d+)'s checkpoint: (?:written|started) in ([0-9.]+) s")


def run(mode: str, preset: str, steps: int, interval: int, scratch: Path) -> dict:
    """One run of the recipe; the loop's time to step `steps` and the seconds each scheduled save held it."""
    out = scratch / mode
    saving = ["checkpoint.save_interval=null"] if mode == "none" else [f"checkpoint.save_interval={interval}"]
    command = [sys.executable, str(ROOT / "recipes" / "demo.py"), f"model={preset}", f"trainer.max_steps={steps}"]
    command += ["trainer.log_interval=1", "trainer.eval_interval=null", f"output_dir={out}", *saving, *MODES[mode]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = next(row["elapsed"] for row in rows if row.get("step") == steps and "loss" in row)
    held = [float(seconds) for step, seconds in HELD.findall(result.stderr) if int(step) < steps]
    return {"loop_s": elapsed, "held_s": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    saves = (args.steps - 1) // args.interval  # the scheduled saves before the last step
    if saves < 1:
        raise SystemExit("--interval must leave at least one scheduled save before --steps")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(run(mode, args.preset, args.steps, args.interval, Path(scratch) / mode))
    loop = {mode: statistics.median(r["loop_s"] for r in results) for mode, results in runs.items()}
    held = {mode: statistics.median(s for r in runs[mode] for s in r["held_s"]) for mode in ("sync", "async")}
    cost = {mode: (loop[mode] - loop["none"]) / saves for mode in ("sync", "async")}
    print(
        f"{args.preset}: {args.steps} steps, a save every {args.interval} ({saves} before the last step), "
        f"median of {args.rounds} rounds"
    )
    print(f"{'mode':<6} {'loop s':>8} {'cost/save s':>12} {'held/save s':>12}")
    for mode in MODES:
        extra = f"{cost[mode]:>12.2f} {held[mode]:>12.2f}" if mode in cost else f"{'-':>12} {'-':>12}"
        print(f"{mode:<6} {loop[mode]:>8.2f} {extra}")
    ratio = cost["async"] / cost["sync"] if cost["sync"] > 0 else float("nan")
    print(f"async / sync: cost per save {ratio:.2f}, loop held per save {held['async'] / held['sync']:.3f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "loop_s": loop, "held_s": held, "cost_s": cost, "runs": runs}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
