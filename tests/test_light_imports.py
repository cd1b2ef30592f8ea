"""Configs are composed and checked without torch or megatron-core.

`python -m launchers ... --dry-run` runs on login nodes, where `import torch` from a shared filesystem can take
longer than the whole dry run; and a recipe given a misspelt key or a wrongly typed value should say so before it
spends seconds importing torch and megatron. Each case runs in a fresh interpreter whose import system refuses
torch, megatron, transformers and numpy, so any import of them on the way fails the test with its name.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steerlm.config.store import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "transformers", "numpy")

# Installs the refusal, then runs argv[1] ("-m module" or a script path) with the remaining arguments.
RUNNER = textwrap.dedent(
    f"""
    import runpy, sys

    class RefuseHeavy:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HEAVY!r}:
                raise ImportError(f"refused import of {{name}}: this path must not need it")

    sys.meta_path.insert(0, RefuseHeavy())
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_refusing_heavy(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_refusal_bites():
    """The harness itself: a path that does import torch fails with the refusal."""
    result = run_refusing_heavy("-m", "steerlm.data.collate")
    assert result.returncode != 0
    assert "refused import of torch" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train_sft", "model=llama3_8b", "parallel=tp8", "precision=bf16", "cluster=slurm", "cluster.gpus_per_node=8"],
        [
            "demo",
            "model=llama2_70b",
            "parallel=tp8_pp2",
            "parallel.data_parallel_size=2",
            "precision=bf16",
            "cluster=slurm",
        ],
        ["--pipeline", "demo", "cluster=slurm_cpu"],
    ],
    ids=["sft_8b_slurm", "70b_memory_estimate", "pipeline"],
)
def test_launcher_dry_run_needs_no_torch(args):
    result = run_refusing_heavy("-m", "launchers", *args)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH" in result.stdout


def test_serving_dry_run_reads_the_checkpoint_without_torch(tmp_path):
    """Sizing a server reads its checkpoint's saved config (`launchers.generation_memory`), not its weights."""
    from tests.test_generation_memory import _checkpoint

    sft = _checkpoint(tmp_path, "sft", ["model=llama3_8b", "precision=bf16"])
    argv = ["serve", f"checkpoint={sft}", "parallel=tp2", "precision=bf16", "cluster=slurm", "cluster.gpus_per_node=2"]
    result = run_refusing_heavy("-m", "launchers", *argv)
    assert result.returncode == 0, result.stderr
    assert "memory per GPU while serving" in result.stderr and "KV cache" in result.stderr


def test_launcher_refuses_a_bad_config_without_torch():
    result = run_refusing_heavy("-m", "launchers", "train_sft", "trainer.micro_batch_size=3")
    assert result.returncode == 2, result.stderr
    assert "trainer.global_batch_size=32: not divisible by" in result.stderr
    assert "refused import" not in result.stderr


RECIPES = sorted(path.stem for path in RECIPES_DIR.glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_reports_an_unknown_key_before_importing_torch(recipe, tmp_path):
    """`+no_such_key=1` passes Hydra (the + adds it) and is refused by steerlm's typed config, before any stage
    module (and with it torch and megatron) is imported."""
    result = run_refusing_heavy(str(RECIPES_DIR / f"{recipe}.py"), "+no_such_key=1", cwd=tmp_path)
    assert result.returncode == 1
    assert "no_such_key=1: is not a key of" in result.stderr, result.stderr
    assert "refused import" not in result.stderr
