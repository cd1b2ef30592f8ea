"""Run recipes as users do (a subprocess, optionally under torchrun) and read their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# --standalone: a free rendezvous port per launch, so concurrent launches (pytest -n 2) never share one
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def recipe_command(recipe: str, args: list[str], launcher: list[str] | None = None) -> list[str]:
    return (launcher or [sys.executable]) + [str(ROOT / "recipes" / f"{recipe}.py"), *args]


def recipe_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_recipe(
    recipe: str, args: list[str], launcher: list[str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        recipe_command(recipe, args, launcher),
        cwd=ROOT,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_recipe(recipe: str, args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        recipe_command(recipe, args, launcher),
        cwd=ROOT,
        env=recipe_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (which no two runs share)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed")} for row in rows]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metric_rows(run_dir) if "loss" in row}


def synthetic_world(out: Path, *overrides: str) -> Path:
    """`prepare_data data=synthetic` into `out`, with `synthetic.*` overrides (sizes, seed, noise)."""
    made = run_recipe("prepare_data", ["data=synthetic", f"output={out}", *overrides])
    assert made.returncode == 0, made.stderr[-2000:]
    return out


def train_apm(data: Path, out: Path, *overrides: str) -> Path:
    """`train_attribute_model` on a synthetic world's ratings and tokenizer (in `data`) into `out`."""
    args = [f"data.train_file={data}/annotated.jsonl", f"tokenizer.path={data}/tokenizer", f"output_dir={out}"]
    trained = run_recipe("train_attribute_model", [*args, *overrides])
    assert trained.returncode == 0, trained.stderr[-2000:]
    return out


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a steerlm checkpoint (model, optimizer), read without megatron by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(path, Path(scratch) / "state.pt")
        state = torch.load(Path(scratch) / "state.pt", weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
