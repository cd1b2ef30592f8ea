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

TRAIN = (
    ("train_1b", "SFT step llama3_2_1b, bf16, seq 4096, half prompt"),
    ("train_8b_8l", "SFT step llama3_8b shape, 8 layers, bf16, seq 4096, half prompt"),
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
            f"| {label}: TFLOP/s, peak memory | {hf['tflops']:.0f}, {hf['peak_gib']:.1f} GiB | "
            f"{ours['tflops']:.0f}, {ours['peak_gib']:.1f} GiB | {data['ratio']:.2f}x | >= {TARGETS['train']}x |"
        )
    return rows


def _generate_rows(results: Path, statuses: dict[str, int]) -> list[str]:
    path = results / "generate_1b.json"
    if not path.exists():
        return [f"| decode llama3_2_1b, bf16 | {_missing('generate_1b', statuses)} | | | |"]
    data = json.loads(path.read_text())
    rows = []
    for batch, result in data["batches"].items():
        ours = {name: value for name, value in result.items() if name not in ("hf", "same_tokens")}
        best = max(ours, key=ours.get)
        others = ", ".join(f"{name} {value:.0f}" for name, value in ours.items())
        rows.append(
            f"| decode llama3_2_1b, bf16, batch {batch}, prompt 512: tokens/s | {result['hf']:.0f} | "
            f"{ours[best]:.0f} ({best}; {others}) | {ours[best] / result['hf']:.2f}x | "
            f">= {TARGETS.get(int(batch), 1.0)}x; same tokens as HF: {'yes' if result['same_tokens'] else 'no'} |"
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
