"""The demo recipe end to end, as users run it: one process, torchrun at TP=2, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recipe_runner import TORCHRUN_2, run_recipe, summary, train_losses

FAST = ["trainer.max_steps=30", "trainer.log_interval=5", "trainer.eval_interval=10"]

pytestmark = pytest.mark.slow


def _run(args: list[str], launcher: list[str] | None = None):
    return run_recipe("demo", args, launcher)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = _run([*FAST, f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_demo_learns_the_text(single: Path) -> None:
    result = summary(single)
    assert result["final_valid_loss"] < result["unigram_baseline"] < result["initial_valid_loss"]
    losses = list(train_losses(single).values())
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [step for step, _ in result["evaluations"]] == [10, 20, 30]
    assert "tensor_model_parallel_size: 1" in (single / "config.yaml").read_text()
    assert list((single / "tensorboard").glob("events.out.tfevents.*"))


def test_torchrun_tp2_reproduces_the_single_process_run(single: Path, tmp_path: Path) -> None:
    result = _run([*FAST, "parallel=tp2", f"output_dir={tmp_path}"], launcher=TORCHRUN_2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(tmp_path) == pytest.approx(train_losses(single), rel=1e-5)
    assert summary(tmp_path)["layout"].startswith("world=2 tp=2 pp=1")


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
