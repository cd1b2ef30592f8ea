"""`bench/gpu_suite.sh`, what a session lent a GPU runs first, checked on any machine: with `SUITE_SHAPES=smoke` its
stages run on the tiny preset, and its table must report every one of them. A GPU session is rare and short
(docs/performance.md), so it should spend its minutes measuring, not finding out that the suite is broken."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
table = runpy.run_path(str(REPO / "bench" / "gpu_table.py"))["table"]


def _suite(out: Path, shapes: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "SUITE_SHAPES": shapes, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "bench/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    result = _suite(out, "smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()[2:]]


def test_every_stage_runs_and_the_table_reports_each(smoke: Path) -> None:
    statuses = dict(line.split() for line in (smoke / "status.txt").read_text().splitlines())
    assert statuses == {"tests": "0", "train_1b": "0", "train_8b_8l": "0", "generate_1b": "0"}
    printed = (smoke / "table.md").read_text()
    assert printed.strip() == table(smoke)
    rows = _rows(printed)
    device = json.loads((smoke / "train_1b.json").read_text())["device"]
    assert [row[0] for row in rows] == [
        "GPU tests (`pytest -m gpu`)",
        f"SFT step tiny, bf16, seq 64 x 1, first 32 positions prompt ({device}): TFLOP/s, peak memory",
        f"SFT step tiny shape, 1 layers, bf16, seq 64 x 1, first 32 positions prompt ({device}): TFLOP/s, peak memory",
        f"decode tiny, bf16, prompt 16 + 4 new, batch 1 ({device}): tokens/s",
        f"decode tiny, bf16, prompt 16 + 4 new, batch 32 ({device}): tokens/s",
    ]
    assert " 0 failed" in rows[0][1]
    peak = "GiB" if torch.cuda.is_available() else "no peak (CPU)"  # peak memory is measured on a GPU only
    for row in rows[1:3]:  # TFLOP/s and peak memory, both sides, and their ratio
        assert row[1].endswith(peak) and row[2].endswith(peak)
        assert float(row[3].rstrip("x")) > 0
    for row in rows[3:]:
        assert float(row[1]) > 0 and float(row[3].rstrip("x")) > 0
        assert "same tokens as HF: yes" in row[4] or "same tokens as HF: at ties only" in row[4]
    decoded = json.loads((smoke / "generate_1b.json").read_text())
    for result in decoded["batches"].values():  # every steerlm decoder wrote HF's tokens, or differs at ties only
        assert result["same_tokens"] == (not any(result["rows_differing"].values()))
        assert not any(result["untied"].values()), result
    recorded = json.loads((smoke / "train_8b_8l.json").read_text())
    assert (recorded["preset"], recorded["layers"], recorded["seq_length"], recorded["prompt"]) == ("tiny", 1, 64, 32)


def test_the_table_reads_gpu_results_and_names_what_did_not_finish(smoke: Path, tmp_path: Path) -> None:
    """A GPU run records peak memory; a stage killed by its time limit (124) leaves no results but its status."""
    shutil.copy(smoke / "tests.xml", tmp_path / "tests.xml")
    gpu = json.loads((smoke / "train_1b.json").read_text())
    gpu["device"] = "NVIDIA H200"
    gpu["hf"].update(tflops=303.4, peak_gib=58.7)
    gpu["steerlm"].update(tflops=500.2, peak_gib=42.6)
    gpu["ratio"] = 1.27
    (tmp_path / "train_1b.json").write_text(json.dumps(gpu))
    decoded = json.loads((smoke / "generate_1b.json").read_text())
    tied, untied = decoded["batches"]["1"], decoded["batches"]["32"]
    tied.update(same_tokens=False, rows_differing={"lean": 1, "megatron": 0}, untied={"lean": 0, "megatron": 0})
    untied.update(same_tokens=False, rows_differing={"lean": 2, "megatron": 1}, untied={"lean": 1, "megatron": 0})
    (tmp_path / "generate_1b.json").write_text(json.dumps(decoded))
    (tmp_path / "status.txt").write_text("tests 0\ntrain_1b 0\ntrain_8b_8l 124\ngenerate_1b 0\n")
    rows = _rows(table(tmp_path))
    assert rows[1][1:] == ["303.4, 58.7 GiB", "500.2, 42.6 GiB", "1.27x", ">= 1.2x"]
    assert "(NVIDIA H200)" in rows[1][0]
    assert rows[2][:2] == ["SFT step llama3_8b shape, 8 layers", "out of time"]
    assert rows[3][4].endswith("at ties only (rows differing: lean 1; each first where HF's logits tie)")
    assert rows[4][4].endswith("no (rows differing: lean 2, megatron 1; 1 not at a tie)")
    (tmp_path / "generate_1b.json").unlink()
    (tmp_path / "status.txt").write_text("tests 0\ntrain_1b 0\ntrain_8b_8l 0\ngenerate_1b 1\n")
    assert _rows(table(tmp_path))[3][:2] == ["decode llama3_2_1b", "failed (exit 1)"]


def test_unknown_shapes_are_refused(tmp_path: Path) -> None:
    result = _suite(tmp_path, "huge")
    assert result.returncode == 2
    assert "SUITE_SHAPES=huge: give gpu (the default) or smoke" in result.stderr
    assert not (tmp_path / "status.txt").exists()


def test_a_tie_is_one_step_of_the_dtype_at_the_logit() -> None:
    step = runpy.run_path(str(REPO / "bench" / "generate_throughput.py"))["_step"]
    assert step(0.4922, torch.bfloat16) == 2**-9  # bf16 keeps 8 significant bits: 0.4922 lies in [2^-2, 2^-1)
    assert step(-3.0, torch.bfloat16) == 2**-6
    assert step(1.0, torch.float32) == 2**-23
    assert step(0.0, torch.bfloat16) == torch.finfo(torch.bfloat16).eps * torch.finfo(torch.bfloat16).tiny
