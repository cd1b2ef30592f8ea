"""The one table `bench/gpu_suite.sh` ends with, from what its stages left in the results directory.

    python bench/gpu_table.py /tmp/steerlm_gpu_suite

Reads `status.txt` (stage exit statuses), `tests.xml` (pytest's JUnit report), `train_*.json` and
`generate_1b.json`; a stage without results shows its exit status (124: out of time).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TRAIN = (  # the suite's training stages, and what each measures when it left no results
    ("train_1b", "SFT step llama3_2_1b"),
    ("train_8b_8l", "SFT step llama3_8b shape, 8 layers"),
)
TARGETS = {"train": 1.2, 1: 10.0, 32: 2.0}  # issue #20: training step vs HF; decoding vs HF generate per batch size


def _statuses(results: Path) -> dict[str, int]:
    path = results / "status.txt"
    if not path.exists():
        return {}
    return {name: int(code) for name, code in (line.split() for line in path.read_text().splitlines() if line)}


def _missing(name: str, statuses: dict[str, int]) -> str:
    code = statuses.get(name)
    return "not run" if code is None else ("out of time" if code == 124 else f"failed (exit {code})")


def _tests_row(results: Path, statuses: dict[str, int]) -> str:
    path = results / "tests.xml"
    if not path.exists():
        return f"| GPU tests (`pytest -m gpu`) | {_missing('tests', statuses)} | | | |"
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    skipped = sorted(
        {
            (case.find("skipped").get("message") or "")[:60]
            for case in suite.iter("testcase")
            if case.find("skipped") is not None
        }
    )
    detail = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    notes = ("failed: " + ", ".join(failed[:6]) + "; ") if failed else ""
    notes += ("skipped because: " + "; ".join(skipped)) if skipped else ""
    return f"| GPU tests (`pytest -m gpu`) | {detail} | | | {notes} |"


def _peak(result: dict) -> str:
    """Peak memory where the benchmark measured it (GPUs); a CPU run has none."""
    return f"{result['peak_gib']:.1f} GiB" if "peak_gib" in result else "no peak (CPU)"


def _train_label(data: dict) -> str:
    """What a training JSON measured, from the shape it recorded."""
    layers = f" shape, {data['layers']} layers" if data["layers"] else ""
    prompt = f", first {data['prompt']} positions prompt" if data["prompt"] else ""
    return (
        f"SFT step {data['preset']}{layers}, {data['dtype']}, seq {data['seq_length']} x {data['micro_batch_size']}"
        f"{prompt} ({data['device']})"
    )


def _train_rows(results: Path, statuses: dict[str, int]) -> list[str]:
    rows = []
    for name, label in TRAIN:
        path = results / f"{name}.json"
        if not path.exists():
            rows.append(f"| {label} | {_missing(name, statuses)} | | | |")
            continue
        data = json.loads(path.read_text())
        hf, ours = data["hf"], data["steerlm"]
        rows.append(
            f"| {_train_label(data)}: TFLOP/s, peak memory | {hf['tflops']:.1f}, {_peak(hf)} | "
            f"{ours['tflops']:.1f}, {_peak(ours)} | {data['ratio']:.2f}x | >= {TARGETS['train']}x |"
        )
    return rows


def _agreement(result: dict) -> str:
    """Whether every steerlm decoder wrote HF's tokens; where not, whether only at ties of HF's own logits."""
    if result["same_tokens"]:
        return "yes"
    differing = ", ".join(f"{name} {count}" for name, count in result["rows_differing"].items() if count)
    untied = sum(result["untied"].values())
    if not untied:
        return f"at ties only (rows differing: {differing}; each first where HF's logits tie)"
    return f"no (rows differing: {differing}; {untied} not at a tie)"


def _generate_rows(results: Path, statuses: dict[str, int]) -> list[str]:
    path = results / "generate_1b.json"
    if not path.exists():
        return [f"| decode llama3_2_1b | {_missing('generate_1b', statuses)} | | | |"]
    data = json.loads(path.read_text())
    shape = f"decode {data['preset']}, {data['dtype']}, prompt {data['prompt_tokens']} + {data['new_tokens']} new"
    rows = []
    for batch, result in data["batches"].items():
        ours = {name: value for name, value in result.items() if isinstance(value, float) and name != "hf"}
        best = max(ours, key=ours.get)
        others = ", ".join(f"{name} {value:.0f}" for name, value in ours.items())
        rows.append(
            f"| {shape}, batch {batch} ({data['device']}): tokens/s | {result['hf']:.0f} | "
            f"{ours[best]:.0f} ({best}; {others}) | {ours[best] / result['hf']:.2f}x | "
            f">= {TARGETS.get(int(batch), 1.0)}x; same tokens as HF: {_agreement(result)} |"
        )
    return rows


def table(results: Path) -> str:
    statuses = _statuses(results)
    lines = ["| measurement | HF transformers | steerlm | steerlm / HF | target, notes |", "|---|---|---|---|---|"]
    lines.append(_tests_row(results, statuses))
    lines += _train_rows(results, statuses)
    lines += _generate_rows(results, statuses)
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
