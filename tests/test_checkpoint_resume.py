"""Checkpoints and resume through the demo recipe: kill -9, SIGTERM/SIGUSR1, a change of layout, and a
checkpoint of another model shape."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.recipe_runner import (
    TORCHRUN_2,
    checkpoint_tensors,
    metric_rows,
    run_recipe,
    start_recipe,
    summary,
    train_losses,
)

pytestmark = pytest.mark.slow

RUN = ["trainer.log_interval=5", "trainer.eval_interval=10", "checkpoint.save_interval=10"]
POLL_SECONDS = 0.01
WAIT_SECONDS = 240


def _ok(args: list[str], launcher: list[str] | None = None) -> None:
    result = run_recipe("demo", args, launcher)
    assert result.returncode == 0, result.stderr[-3000:]


def _wait_for(condition, process) -> None:
    """Poll until `condition()` holds; fail if the process ends first or it takes too long."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert process.poll() is None, f"the run ended before the condition held: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(POLL_SECONDS)


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[1]) if pointer.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _ok([*RUN, "trainer.max_steps=60", f"output_dir={out}"])
    return out


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill9_between_checkpoints_then_rerun_equals_uninterrupted_run(
    uninterrupted: Path, tmp_path: Path, async_save: bool
) -> None:
    args = [*RUN, "trainer.max_steps=60", f"checkpoint.async_save={str(async_save).lower()}", f"output_dir={tmp_path}"]
    process = start_recipe("demo", args)
    _wait_for(lambda: _latest_step(tmp_path) >= 10, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = _latest_step(tmp_path)
    assert killed_at < 60 and not (tmp_path / "summary.json").exists()

    _ok(args)
    resumed = summary(tmp_path)
    assert resumed["start_step"] == killed_at
    assert resumed["weights_sha256"] == summary(uninterrupted)["weights_sha256"]
    assert metric_rows(tmp_path) == metric_rows(uninterrupted)  # every loss, lr, grad norm, val loss, bitwise


def test_only_the_last_checkpoints_are_kept_and_each_carries_its_config(uninterrupted: Path) -> None:
    root = uninterrupted / "checkpoints"
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_0000050", "step_0000060"]
    assert (root / "latest").read_text().strip() == "step_0000060"
    assert "max_steps: 60" in (root / "step_0000060" / "config.yaml").read_text()


def test_async_saves_publish_the_checkpoints_and_numbers_of_synchronous_ones(uninterrupted: Path, tmp_path: Path):
    """`checkpoint.async_save`: steps 10-50 are saved by forked writers while training goes on, step 60 (the last)
    before the run ends; the same weights, metrics and kept checkpoints as the synchronous run, and step 50's
    checkpoint holds the tensors of the synchronous run's step 50."""
    result = run_recipe("demo", [*RUN, "trainer.max_steps=60", "checkpoint.async_save=true", f"output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("written while training goes on") == 5
    assert "step 60's checkpoint: written in" in result.stderr
    assert summary(tmp_path)["weights_sha256"] == summary(uninterrupted)["weights_sha256"]
    assert metric_rows(tmp_path) == metric_rows(uninterrupted)
    root, reference = tmp_path / "checkpoints", uninterrupted / "checkpoints"
    assert sorted(path.name for path in root.iterdir()) == sorted(path.name for path in reference.iterdir())
    saved, expected = checkpoint_tensors(root / "step_0000050"), checkpoint_tensors(reference / "step_0000050")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in expected)


def test_wall_time_limit_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    _ok(["trainer.max_time_minutes=0.0001", "trainer.max_steps=1000", f"output_dir={tmp_path}"])
    stopped = summary(tmp_path)
    assert stopped["stop_reason"] == "trainer.max_time_minutes reached"
    assert stopped["last_step"] < 1000 and _latest_step(tmp_path) == stopped["last_step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_the_current_step_and_exits_zero(signum: int, tmp_path: Path) -> None:
    args = ["trainer.log_interval=1", "trainer.max_steps=100000", f"output_dir={tmp_path}"]
    process = start_recipe("demo", args)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, process)
    process.send_signal(signum)
    assert process.wait(timeout=WAIT_SECONDS) == 0, process.stderr.read()[-3000:]
    stopped = summary(tmp_path)
    assert stopped["stop_reason"] == f"received {signal.Signals(signum).name}"
    assert 3 <= stopped["last_step"] < 100000
    assert _latest_step(tmp_path) == stopped["last_step"]

    _ok([f"trainer.max_steps={stopped['last_step'] + 2}", f"output_dir={tmp_path}"])
    resumed = summary(tmp_path)
    assert resumed["start_step"] == stopped["last_step"]
    assert resumed["initial_weights_sha256"] == stopped["weights_sha256"]


def test_resume_across_layouts_tp2_to_pp2_and_back_continues_the_loss_curve(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """Steps 1-20 at TP=2, 21-40 at PP=2, 41-60 at TP=2 equal one uninterrupted run: weights move
    between layouts bit for bit and the Adam moments come with them."""
    schedule = [*RUN, "optim.lr_decay_steps=60", f"output_dir={tmp_path}"]
    reference = [*RUN, "optim.lr_decay_steps=60", "trainer.max_steps=60"]
    expected_dir = tmp_path.parent / "single_with_fixed_schedule"
    _ok([*reference, f"output_dir={expected_dir}"])
    previous = None
    for steps, layout in ((20, "tp2"), (40, "pp2"), (60, "tp2")):
        _ok([*schedule, f"trainer.max_steps={steps}", f"parallel={layout}"], launcher=TORCHRUN_2)
        current = summary(tmp_path)
        assert current["layout"].startswith(
            f"world=2 tp={2 if layout == 'tp2' else 1} pp={2 if layout == 'pp2' else 1}"
        )
        if previous is not None:
            assert current["start_step"] == previous["last_step"]
            assert current["initial_weights_sha256"] == previous["weights_sha256"]
            assert current["initial_valid_loss"] == pytest.approx(previous["final_valid_loss"], rel=1e-6)
        previous = current
    assert train_losses(tmp_path) == pytest.approx(train_losses(expected_dir), rel=1e-5)


def test_distributed_optimizer_resumes_at_another_layout_and_either_kind_of_optimizer_resumes_the_other(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """Steps 1-20 at DP=2 with megatron's distributed optimizer (torch Adam: moments and fp32 master weights
    sharded over the two ranks), 21-40 at DP=1 with a plain optimizer from its checkpoint, 41-60 at TP=2 with the
    distributed optimizer again: the loss curve of one uninterrupted (plain-optimizer) run continues."""
    args = [*RUN, "optim.lr_decay_steps=60", f"output_dir={tmp_path}"]
    distributed = "parallel.use_distributed_optimizer=true"
    legs = ((20, [distributed], "world=2 tp=1 pp=1 cp=1 dp=2"), (40, [], "world=1 tp=1 pp=1 cp=1 dp=1"))
    legs += ((60, [distributed, "parallel=tp2"], "world=2 tp=2 pp=1 cp=1 dp=1"),)
    previous = None
    for steps, extra, layout in legs:
        _ok([*args, *extra, f"trainer.max_steps={steps}"], launcher=TORCHRUN_2 if "world=2" in layout else None)
        current = summary(tmp_path)
        assert current["layout"].startswith(layout)
        if previous is not None:
            assert current["start_step"] == previous["last_step"]
            assert current["initial_weights_sha256"] == previous["weights_sha256"]
        previous = current
    assert train_losses(tmp_path) == pytest.approx(train_losses(uninterrupted), rel=1e-5)


def test_resume_from_a_checkpoint_of_another_model_shape_is_refused(tmp_path: Path) -> None:
    _ok(["trainer.max_steps=2", f"output_dir={tmp_path}"])
    result = run_recipe("demo", ["trainer.max_steps=4", "model.num_layers=4", f"output_dir={tmp_path}"])
    assert result.returncode != 0
    assert "model.num_layers=4: checkpoint" in result.stderr
    assert "was written for model.num_layers=2" in result.stderr


def check_bf16_resume(tmp_path: Path, extra: tuple[str, ...] | list[str] = ()) -> None:
    """bf16 compute with fp32 master weights: 10 steps, checkpoint, resume to 20 ≈ 20 straight steps."""
    common = [
        "precision=bf16",
        # one micro-batch of 8 per step: CPUs without bf16 units emulate its matmuls (~2.5 s a step at 16 rows)
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        "checkpoint.save_interval=10",
        "trainer.log_interval=5",
        "optim.lr_decay_steps=20",
        *extra,
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summaries = []
    for steps, out in ((20, straight), (10, resumed), (20, resumed)):
        _ok([*common, f"trainer.max_steps={steps}", f"output_dir={out}"])
        summaries.append(summary(out))
    assert summaries[2]["start_step"] == 10
    assert summaries[2]["initial_weights_sha256"] == summaries[1]["weights_sha256"]
    assert summaries[0]["final_valid_loss"] < summaries[0]["unigram_baseline"]
    print(f"\nbf16 on {summaries[0]['layout']}: straight {train_losses(straight)}, resumed {train_losses(resumed)}")
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=2e-3)


def test_bf16_trains_and_resumes_on_cpu(tmp_path: Path) -> None:
    check_bf16_resume(tmp_path)


def test_the_checkpoint_benchmark_times_the_three_modes_side_by_side(tmp_path: Path) -> None:
    """`bench/async_checkpoint.py`: runs without, with synchronous and with asynchronous saves; each save's hold on
    the loop is read from the recipe's log."""
    import json
    import subprocess
    import sys

    from tests.recipe_runner import ROOT, recipe_env

    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "async_checkpoint.py"), "--preset", "tiny", "--steps", "3"]
    command += ["--interval", "1", "--rounds", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "async / sync: cost per save" in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["loop_s"]) == {"none", "sync", "async"} and all(v > 0 for v in figures["loop_s"].values())
    assert [len(run["held_s"]) for mode in ("sync", "async") for run in figures["runs"][mode]] == [2, 2]


def test_async_saves_on_two_ranks_with_the_distributed_optimizer_equal_synchronous_ones(tmp_path: Path) -> None:
    """DP=2, megatron's distributed optimizer (each rank writes its half of Adam's state): the checkpoint of step 15,
    written by both ranks' forked writers while steps 16-20 trained, equals the synchronous run's."""
    args = ["trainer.max_steps=20", "checkpoint.save_interval=5", "parallel.use_distributed_optimizer=true"]
    for mode in ("false", "true"):
        _ok([*args, f"checkpoint.async_save={mode}", f"output_dir={tmp_path / mode}"], launcher=TORCHRUN_2)
    assert summary(tmp_path / "true")["weights_sha256"] == summary(tmp_path / "false")["weights_sha256"]
    saved = checkpoint_tensors(tmp_path / "true" / "checkpoints" / "step_0000015")
    expected = checkpoint_tensors(tmp_path / "false" / "checkpoints" / "step_0000015")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in expected)
    assert any(key.startswith("optimizer.") for key in expected)
