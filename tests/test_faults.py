"""Faults injected on purpose, one per test (the test's name says which): nothing is lost and nothing goes silently
wrong. Training and annotation run in this process on the tiny model (a few steps, a few rows) to stay fast; the
kill -9 test needs a process of its own."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from launchers.config import ClusterConfig, Scheduler
from steerlm.checkpoint.integrity import CheckpointError, verify_checksums
from steerlm.checkpoint.sharded import check_readable, latest_checkpoint
from steerlm.config import compose, to_typed
from steerlm.config.annotate import AnnotateConfig, AnnotateMode
from steerlm.config.schema import AttributeModelConfig, PrepareDataConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.readers import BadRowPolicy, DataFormat, RejectSink, read_records
from steerlm.errors import ConfigError, DataError
from steerlm.stages import annotate, attribute_model, prepare_data, pretrain
from steerlm.stages.pretrain import TextLMStage
from steerlm.training.guards import NonFiniteTraining
from steerlm.training.metrics import MetricsLog
from tests.recipe_runner import ROOT, metric_rows, recipe_command, recipe_env
from tests.schemas import STEERLM_OASST_ATTRIBUTES

pytestmark = pytest.mark.slow
# the demo at one layer of width 64, four sequences of 32 tokens a step
SMALL = ["model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=176", "trainer.seq_length=32"]
SMALL += ["trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.log_interval=1"]
WAIT_SECONDS = 120
SCHEMA = AttributeSchema("steerlm_oasst", STEERLM_OASST_ATTRIBUTES)


@pytest.fixture
def steerlm_log():
    """Messages the `steerlm` loggers emit during the test (whatever an earlier test did to logging)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("steerlm")
    level, logger.level = logger.level, logging.INFO
    for name, existing in logging.root.manager.loggerDict.items():
        if name.startswith("steerlm") and isinstance(existing, logging.Logger):
            existing.disabled = False
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _demo(out: Path, *overrides: str):
    return pretrain.run(to_typed(compose("demo", [*SMALL, f"output_dir={out}", *overrides])))


def _checkpoints(out: Path) -> list[str]:
    return sorted(path.name for path in (out / "checkpoints").iterdir() if path.name != "latest")


# --- checkpoints -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """An uninterrupted run of 4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _demo(out, "trainer.max_steps=4", "checkpoint.save_interval=2")
    return out


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_one(
    four_steps: Path, tmp_path: Path, steerlm_log: list[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    shard = run / "checkpoints" / "step_0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    shard.write_bytes(bytes(data))

    resumed = _demo(run, "trainer.max_steps=4", "checkpoint.save_interval=2")
    assert any(f"{shard}: its content differs from the SHA-256" in message for message in steerlm_log)
    assert any("resuming from" in m and m.split("resuming from ")[1].startswith(str(run)) for m in steerlm_log)
    assert any("step_0000004 -> corrupt.step_0000004" in message for message in steerlm_log)
    assert resumed.start_step == 2
    # steps 3-4 again from step 2: the curve of the uninterrupted run, bit for bit
    assert metric_rows(run) == metric_rows(four_steps)
    assert resumed.weights_sha256 == json.loads((four_steps / "summary.json").read_text())["weights_sha256"]
    assert _checkpoints(run) == ["corrupt.step_0000004", "step_0000002", "step_0000004"]
    assert verify_checksums(run / "checkpoints" / "step_0000004")  # saved again, intact


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("__0_1.distcp", lambda data: data[: len(data) // 3]),  # truncated
        ("common.pt", lambda data: b"garbage" + data[7:]),
        (".metadata", lambda data: data[:100]),
        ("metadata.json", lambda data: b"{not json"),
        ("steerlm_checkpoint.json", lambda data: b'{"step": '),
    ],
    ids=["truncated-shard", "garbled-common.pt", "truncated-.metadata", "garbled-metadata.json", "garbled-meta-json"],
)
def test_a_damaged_checkpoint_file_is_refused_naming_it(four_steps: Path, tmp_path: Path, name: str, damage) -> None:
    checkpoint = tmp_path / "step_0000002"
    shutil.copytree(four_steps / "checkpoints" / "step_0000002", checkpoint)
    (checkpoint / name).write_bytes(damage((checkpoint / name).read_bytes()))
    with pytest.raises(CheckpointError, match="Fix: ") as checked:
        verify_checksums(checkpoint)
    assert checked.value.path == checkpoint / name
    if name != "__0_1.distcp":  # without checksums (checkpoint.verify=false) the index files are still read first
        with pytest.raises(CheckpointError) as read:
            check_readable(checkpoint)
        assert read.value.path == checkpoint / name and "cannot be read" in str(read.value)


def test_unwritable_checkpoints_directory_is_refused_before_step_1(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a directory")  # as root, a read-only mode would not stop a write
    with pytest.raises(ConfigError, match=f"checkpoints cannot be written to {tmp_path / 'checkpoints'}"):
        _demo(tmp_path, "trainer.max_steps=2")
    assert not (tmp_path / "metrics.jsonl").exists()


WRITER = """
import os, runpy, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
write = FileSystemWriterAsync.write_preloaded_data
def slow_write(*args, **kwargs):  # a writer process that is still busy when its parent is killed
    open(os.path.join(os.environ["WRITER_PIDS"], str(os.getpid())), "w").close()
    time.sleep(300)
    return write(*args, **kwargs)
FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_write)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill9_mid_save_leaves_no_checkpoint_writer_behind(tmp_path: Path, async_save: bool) -> None:
    pids = tmp_path / "writers"
    pids.mkdir()
    args = [*SMALL, "trainer.max_steps=3", "checkpoint.save_interval=1", f"output_dir={tmp_path / 'run'}"]
    args.append(f"checkpoint.async_save={str(async_save).lower()}")
    command = [sys.executable, "-c", WRITER, *recipe_command("demo", args)[1:]]
    process = subprocess.Popen(command, cwd=ROOT, env={**recipe_env(), "WRITER_PIDS": str(pids)}, text=True)
    deadline = time.monotonic() + WAIT_SECONDS
    while not any(pids.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint writer started"
        time.sleep(0.05)
    writers = [int(path.name) for path in pids.iterdir()]
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in writers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in writers if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"checkpoint writers {alive} outlived the killed training process by 10 s"


def test_an_async_save_that_cannot_be_written_stops_the_run_naming_it(monkeypatch, tmp_path: Path) -> None:
    """A full disk in step 1's forked writer: step 2 learns it, and the run stops with a CheckpointError naming the
    unpublished checkpoint and the writer's error; nothing is published."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)  # the forked writers inherit it
    with pytest.raises(CheckpointError, match="(?s)writing step 1's checkpoint failed.*No space left on device") as e:
        _demo(tmp_path, "trainer.max_steps=3", "checkpoint.save_interval=1", "checkpoint.async_save=true")
    assert e.value.path == tmp_path / "checkpoints" / ".tmp_step_0000001"
    assert latest_checkpoint(tmp_path) is None
    assert [row["step"] for row in metric_rows(tmp_path) if "loss" in row] == [1, 2]


# --- NaN / Inf -----------------------------------------------------------------------------------------------


def _poison(monkeypatch, steps: set[int], weights: dict[int, torch.Tensor]) -> None:
    """Make the loss NaN at `steps` (the model's output times NaN, a forward hook) and record the first weight
    matrix before every step in `weights`."""
    batches = TextLMStage.batches

    def poisoned(self, ctx, data):
        stage_data = batches(self, ctx, data)
        current = {"step": 0}
        chunk = ctx.setup.chunks[0]
        chunk.register_forward_hook(
            lambda module, inputs, output: output * float("nan") if current["step"] in steps else output
        )
        weight = next(chunk.parameters())

        def train_batch(step: int):
            current["step"] = step
            weights[step] = weight.detach().clone()
            return stage_data.train_batch(step)

        return replace(stage_data, train_batch=train_batch)

    monkeypatch.setattr(TextLMStage, "batches", poisoned)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_nan_loss_at_step_3_stops_at_step_3_without_a_checkpoint_after_it(
    monkeypatch, tmp_path: Path, async_save: bool
) -> None:
    """With `checkpoint.async_save`, step 2's checkpoint, still being written when step 3 fails, is published."""
    _poison(monkeypatch, {3}, {})
    with pytest.raises(
        NonFiniteTraining, match=r"^step 3: the loss is nan \(no update\); training stopped \(1 non-finite steps, "
    ):
        _demo(tmp_path, "trainer.max_steps=4", "checkpoint.save_interval=2", f"checkpoint.async_save={async_save}")
    assert _checkpoints(tmp_path) == ["step_0000002"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000002"
    assert [row["step"] for row in metric_rows(tmp_path)] == [1, 2]


def test_nan_tolerance_skips_the_update_of_a_nan_step_then_stops(
    monkeypatch, tmp_path: Path, steerlm_log: list[str]
) -> None:
    weights: dict[int, torch.Tensor] = {}
    _poison(monkeypatch, {2, 4}, weights)
    with pytest.raises(NonFiniteTraining, match=r"^step 4: .*\(2 non-finite steps, trainer.nan_tolerance=1\)"):
        _demo(tmp_path, "trainer.max_steps=5", "checkpoint.save_interval=3", "trainer.nan_tolerance=1")
    assert "step 2: the loss is nan (no update); tolerated (1 of trainer.nan_tolerance=1)" in steerlm_log
    assert torch.equal(weights[2], weights[3])  # step 2 changed nothing
    assert not torch.equal(weights[1], weights[2]) and not torch.equal(weights[3], weights[4])
    assert _checkpoints(tmp_path) == ["step_0000003"]  # saved after the skipped step: finite


# --- files cut short ---------------------------------------------------------------------------------------


def test_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path: Path, steerlm_log: list[str]) -> None:
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(rows) + '\n{"step": 4, "lo')  # kill -9 in the middle of a write
    MetricsLog(tmp_path, enabled=True, resume_step=3).close()
    assert metrics.read_text() == "\n".join(rows) + "\n"
    assert any(f"{metrics}:4: dropped a torn last line" in message for message in steerlm_log)

    metrics.write_text(rows[0] + "\n{broken\n" + rows[2] + "\n")  # not a torn write: refused, never dropped
    with pytest.raises(DataError, match=f"{metrics}:2: is not a metrics row"):
        MetricsLog(tmp_path, enabled=True, resume_step=3)


@pytest.mark.parametrize("policy", [BadRowPolicy.error, BadRowPolicy.reject])
def test_truncated_gzip_input_is_an_error_naming_the_file(tmp_path: Path, policy: BadRowPolicy) -> None:
    row = {"conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello"}]}
    data = gzip.compress("".join(json.dumps({**row, "n": n}) + "\n" for n in range(2000)).encode())
    path = tmp_path / "input.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with RejectSink(tmp_path / "rejects.jsonl") as sink, pytest.raises(DataError) as error:
        for _ in read_records(path, DataFormat.conversation, SCHEMA, policy, sink):
            pass
    assert str(error.value).startswith(f"{path}:")
    assert "the compressed data ends early: the file is truncated after line" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("partition", "gpu\nrm -rf ~"),
        ("account", "proj --qos=high"),
        ("qos", "high\r"),
        ("mem", "64G\n#SBATCH --exclusive"),
        ("time", "04:00:00\necho"),
        ("sbatch_args", ["--constraint=h100\ntouch /tmp/x"]),
    ],
)
def test_sbatch_fields_cannot_inject_lines(key: str, value) -> None:
    cluster = ClusterConfig(scheduler=Scheduler.slurm, **{key: value})
    with pytest.raises(ConfigError, match=f"^cluster.{key}="):
        cluster.validate()


# --- annotation --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apm_world(tmp_path_factory) -> dict:
    """A tiny synthetic world (40 unlabelled conversations) and an APM trained for one step on its ratings."""
    root = tmp_path_factory.mktemp("apm_world")
    world = [f"output={root}/synthetic", "synthetic.annotated_rows=64", "synthetic.unlabelled_rows=40"]
    world += ["synthetic.eval_prompts=1", "synthetic.corpus_conversations=10", "synthetic.encyclopedia_paragraphs=5"]
    prepare_data.run(to_typed(compose("prepare_data", ["data=synthetic", *world]), PrepareDataConfig))
    data = root / "synthetic"
    apm = [f"data.train_file={data}/annotated.jsonl", f"tokenizer.path={data}/tokenizer", f"output_dir={root}/apm"]
    apm += ["trainer.max_steps=1", "trainer.global_batch_size=16", "trainer.eval_interval=null"]
    attribute_model.run(to_typed(compose("train_attribute_model", apm), AttributeModelConfig))
    rows = (data / "unlabelled.jsonl").read_text().splitlines()
    return {"apm": root / "apm", "rows": rows}


def _annotate(world: dict, source: Path, output: Path, **settings) -> annotate.AnnotateSummary:
    """The annotate recipe's typed config built directly (composing it costs more than annotating 25 rows)."""
    cfg = AnnotateConfig(apm_checkpoint=str(world["apm"]), input=str(source), output=str(output), shard_size=10)
    summary = annotate.run(replace(cfg, **settings))
    assert summary is not None
    return summary


def _assistant_turns(lines: list[str]) -> int:
    return sum(turn["from"] == "Assistant" for line in lines for turn in json.loads(line)["conversations"])


def test_annotate_rerun_on_a_replaced_input_annotates_the_new_rows(
    apm_world: dict, tmp_path: Path, steerlm_log: list[str]
) -> None:
    source, output = tmp_path / "input.jsonl", tmp_path / "labels.jsonl"
    source.write_text("\n".join(apm_world["rows"][:20]) + "\n")
    _annotate(apm_world, source, output)
    new_rows = apm_world["rows"][20:40]
    source.write_text("\n".join(new_rows) + "\n")  # the same path, other rows

    summary = _annotate(apm_world, source, output)
    assert summary.shards_skipped == 0
    assert sum("its input rows changed since it was annotated" in message for message in steerlm_log) == 2
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [[t["value"] for t in row["conversations"]] for row in written] == [
        [t["value"] for t in json.loads(line)["conversations"]] for line in new_rows
    ]
    fresh = tmp_path / "fresh.jsonl"
    _annotate(apm_world, source, fresh)
    assert output.read_bytes() == fresh.read_bytes()
    assert summary.annotated_turns == _assistant_turns(new_rows)


def test_annotate_a_fixed_rejected_row_is_annotated_and_counted(apm_world: dict, tmp_path: Path) -> None:
    rows = apm_world["rows"][:25]
    source, output = tmp_path / "input.jsonl", tmp_path / "labels.jsonl"
    broken = rows[:12] + ['{"conversations": [{"from": "Robot", "value": "hi"}]}'] + rows[13:]
    source.write_text("\n".join(broken) + "\n")
    first = _annotate(apm_world, source, output, on_bad_row=BadRowPolicy.reject)
    assert (first.rows_out, first.rejected) == (24, 1)
    assert json.loads(Path(f"{output}.rejects.jsonl").read_text())["source"] == f"{source}:13"

    source.write_text("\n".join(rows) + "\n")  # line 13 fixed
    fixed = _annotate(apm_world, source, output, on_bad_row=BadRowPolicy.reject)
    assert (fixed.rows_in, fixed.rows_out, fixed.rejected, fixed.shards, fixed.shards_skipped) == (25, 25, 0, 3, 2)
    assert Path(f"{output}.rejects.jsonl").read_text() == ""
    assert fixed.annotated_turns == _assistant_turns(rows)  # the whole output, not the one shard annotated now
    assert json.loads(Path(f"{output}.summary.json").read_text())["annotated_turns"] == fixed.annotated_turns
    fresh = tmp_path / "fresh.jsonl"
    _annotate(apm_world, source, fresh)
    assert output.read_bytes() == fresh.read_bytes()


def test_annotate_changed_settings_annotate_every_shard_again(
    apm_world: dict, tmp_path: Path, steerlm_log: list[str]
) -> None:
    source, output = tmp_path / "input.jsonl", tmp_path / "labels.jsonl"
    source.write_text("\n".join(apm_world["rows"][:20]) + "\n")
    assert _annotate(apm_world, source, output).shards_skipped == 0
    assert _annotate(apm_world, source, output, seq_length=512).shards_skipped == 0
    assert any("seq_length: 1024 -> 512" in message for message in steerlm_log)


def _nemo_aligner_relabel(row: dict, scores: list, schema: AttributeSchema) -> list:
    """NeMo-Aligner's examples/nlp/data/steerlm/attribute_annotate.py (read at commit 15887e5), rewritten: a turn
    whose "label" is present and not None gets every attribute from the model, clipped to [0, 4] and rounded
    (Python's round); the other turns stay as they are."""
    labels = []
    for turn, score in zip(row["conversations"], scores):
        if "label" in turn and turn["label"] is not None:
            values = [round(min(4.0, max(0.0, float(score[name])))) for name in schema.attributes]
            labels.append(",".join(f"{name}:{value}" for name, value in zip(schema.attributes, values)))
        else:
            labels.append(turn.get("label"))
    return labels


def test_annotate_without_verify_checkpoint_skips_the_checksums_and_annotates_alike(
    apm_world: dict, tmp_path: Path
) -> None:
    apm = tmp_path / "apm"
    shutil.copytree(apm_world["apm"], apm, symlinks=True)
    checkpoint = latest_checkpoint(apm)
    assert checkpoint is not None
    listed = json.loads((checkpoint / "checksums.json").read_text())
    name = sorted(listed["files"])[0]
    listed["files"][name]["sha256"] = "0" * 64  # the list disagrees with intact bytes: verification must fail
    (checkpoint / "checksums.json").write_text(json.dumps(listed))
    source = tmp_path / "input.jsonl"
    source.write_text("\n".join(apm_world["rows"][:10]) + "\n")
    with pytest.raises(CheckpointError, match=name):
        _annotate(apm_world, source, tmp_path / "refused.jsonl", apm_checkpoint=str(apm))
    _annotate(apm_world, source, tmp_path / "unverified.jsonl", apm_checkpoint=str(apm), verify_checkpoint=False)
    _annotate(apm_world, source, tmp_path / "intact.jsonl")
    assert (tmp_path / "unverified.jsonl").read_bytes() == (tmp_path / "intact.jsonl").read_bytes()


def test_annotate_relabel_follows_nemo_aligners_rule(apm_world: dict, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in apm_world["rows"][:20]]
    high = ",".join(f"{name}:4" for name in STEERLM_OASST_ATTRIBUTES)
    for number, row in enumerate(rows):  # every other response labelled (all 4s), the rest without a label
        for index, turn in enumerate(row["conversations"]):
            if turn["from"] == "Assistant":
                turn["label"] = high if (number + index) % 2 else None
    source, output = tmp_path / "input.jsonl", tmp_path / "relabelled.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = _annotate(apm_world, source, output, mode=AnnotateMode.relabel)

    written = [json.loads(line) for line in output.read_text().splitlines()]
    expected = [_nemo_aligner_relabel(row, out["attribute_scores"], SCHEMA) for row, out in zip(rows, written)]
    assert [[turn["label"] for turn in out["conversations"]] for out in written] == expected
    labelled = [(r, t) for r, row in enumerate(rows) for t, turn in enumerate(row["conversations"]) if turn["label"]]
    assert summary.annotated_turns == len(labelled) > 0
    assert all((written[r]["attribute_scores"][t] is None) == ((r, t) not in labelled) for r, t in _turns(rows))
    assert sum(written[r]["conversations"][t]["label"] != high for r, t in labelled) > 0  # overwritten, not kept


def _turns(rows: list[dict]) -> list[tuple[int, int]]:
    return [(r, t) for r, row in enumerate(rows) for t in range(len(row["conversations"]))]
