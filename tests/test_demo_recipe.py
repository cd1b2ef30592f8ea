"""The demo recipe end to end, as users run it: one process, torchrun at TP=2, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.py"
FAST = ["trainer.max_steps=30", "trainer.log_interval=5"]

pytestmark = pytest.mark.slow


def _run(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = (launcher or [sys.executable]) + [str(RECIPE), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = _run([*FAST, f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_demo_learns_the_text(single: Path) -> None:
    summary = json.loads((single / "summary.json").read_text())
    assert summary["final_valid_loss"] < summary["unigram_baseline"] < summary["initial_valid_loss"]
    losses = _losses(single)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "tensor_model_parallel_size: 1" in (single / "config.yaml").read_text()


def test_torchrun_tp2_reproduces_the_single_process_run(single: Path, tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    result = _run([*FAST, "parallel=tp2", f"output_dir={tmp_path}"], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(tmp_path) == pytest.approx(_losses(single), rel=1e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layout"].startswith("world=2 tp=2 pp=1")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size=3: world size 1"),
        ("model.hidden_sise=64", "model.hidden_sise"),
        ("output_dir=/etc/hostname/run", "output_dir='/etc/hostname/run': cannot be created"),
        ("precision.dtype=fp16", "precision.dtype='fp16'"),
    ],
)
def test_bad_input_fails_naming_the_key(override: str, expected: str) -> None:
    result = _run([override, "trainer.max_steps=1"])
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
