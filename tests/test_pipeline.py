"""The whole pipeline as `make demo` runs it, on a tiny world: every stage's output, the bootstrap's labels,
the report; kill -9 mid-stage and rerun gives the same report; a stage restarted with other settings is
refused; keep_going runs what does not need a failed stage; the waves read only what earlier waves wrote;
pipeline.parallel=tp2 launches each stage under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zlib
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from steerlm.config import ConfigError, SyntheticConfig, compose, to_typed
from steerlm.config.annotate import AnnotateConfig
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.sft import SFTConfig
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.records import from_conversation_json
from steerlm.data.synthetic.splits import SCHEMA
from steerlm.stages.pipeline import carry_timings, plan, waves
from tests.recipe_runner import ROOT, TORCHRUN_2, recipe_env, run_recipe

TINY = [
    "synthetic.annotated_rows=200",
    "synthetic.unlabelled_rows=300",
    "synthetic.eval_prompts=6",
    "synthetic.num_entities=8",
    "synthetic.encyclopedia_paragraphs=4",
    "synthetic.corpus_conversations=40",
    'stages.pretrain=["trainer.max_steps=12","trainer.eval_interval=null","checkpoint.save_interval=4"]',
    'stages.apm=["trainer.max_steps=8","trainer.eval_interval=null"]',
    'stages.sft=["trainer.max_steps=12","trainer.eval_interval=null","checkpoint.save_interval=4"]',
    'stages.sft_plain=["trainer.max_steps=6","trainer.eval_interval=null"]',
    'stages.bootstrap=["trainer.max_steps=4","bootstrap.num_prompts=10","bootstrap.samples_per_prompt=2",'
    '"bootstrap.max_new_tokens=24","bootstrap.chunk_rows=8"]',
    'stages.steer_sft=["num_prompts=3","max_new_tokens=24"]',
    'stages.steer_bootstrap=["num_prompts=3","max_new_tokens=24"]',
    'stages.steer_plain=["num_prompts=3","max_new_tokens=24"]',
]
REPORT_FILES = (
    "report.md",
    "report.json",
    "eval/steering_sft.json",
    "eval/steering_bootstrap.json",
    "eval/steering_plain.json",
    "bootstrap/iter_1/labelled.jsonl",
    "data/apm_labels.jsonl",
)


def _command(out: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, str(ROOT / "recipes" / "pipeline.py"), f"output_dir={out}", *TINY, *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(out, *extra), cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=1500
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    done = _run(out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
def test_every_stage_writes_its_output_and_the_report(uninterrupted: Path) -> None:
    out = uninterrupted
    for path in (
        "data/corpus.jsonl",
        "base/summary.json",
        "apm/eval.json",
        "sft/eval.json",
        "sft_plain/eval.json",
        "bootstrap/eval.json",
        "figures/steering.png",
        "figures/apm_vs_oracle.png",
        "figures/loss_curves.png",
        "timings.json",
        "eval/fact_recall.json",
    ):
        assert (out / path).is_file(), path
    report = json.loads((out / "report.json").read_text())
    names = {t["name"] for t in report["targets"]}
    assert "APM Pearson correctness" in names and "bootstrap gain at the top setting (quality or exact match)" in names
    assert report["met"] == sum(t["met"] for t in report["targets"])
    md = (out / "report.md").read_text()
    assert f"**Targets: {report['met']} of {report['total']} met" in md and "figures/steering.png" in md
    assert "eval prompts, random knowledge errors." in md.splitlines()[2]
    # the top-setting comparison names its terms: what each SFT started from and how long it trained
    assert "Stage 3 started from `base/` and trained 12 updates; plain SFT started from `base/` and trained 6" in md
    sft = json.loads((out / "eval/steering_sft.json").read_text())
    for sweep in sft["attributes"].values():
        assert set(sweep["levels"]) == {"0", "1", "2", "3", "4"}
        assert all(0.0 <= level["exact_match"] <= 1.0 for level in sweep["levels"].values())
        assert "others_mean_abs_change" in sweep["levels"]["4"] and "min_exact_match" in sweep
    assert set(sft["at_base"]["exact_match"]) == set(SCHEMA.attributes)
    quality, exact = sft["at_base"]["mean_measured"]["quality"], np.mean(list(sft["at_base"]["exact_match"].values()))
    assert f"Stage 3 is {4 - quality:.3f} oracle quality below the top level and {1 - exact:.3f} exact match" in md
    plain = json.loads((out / "eval/steering_plain.json").read_text())
    assert plain["attributes"] == {} and "quality" in plain["at_base"]["mean_measured"]
    # what stage 3 was trained to answer: the labelled turns of the rows it did not hold out (the documented rule:
    # crc32 of "<file name>:<line>" modulo 1000 below the fraction), beside the base request
    lines = json.loads((out / "sft/eval.json").read_text())["attribute_lines"]
    fraction = OmegaConf.load(out / "sft/config.yaml").data.validation_fraction
    labelled = sum(
        1
        for number, row in enumerate(map(json.loads, (out / "data/apm_labels.jsonl").read_text().splitlines()), 1)
        if zlib.crc32(f"apm_labels.jsonl:{number}".encode()) % 1000 >= fraction * 1000
        for turn in row["conversations"]
        if turn["from"] == "Assistant" and turn["label"] is not None
    )
    assert lines["lines"] == labelled and fraction > 0
    on_base = {name: lines["levels"][name].get(f"{value:g}", 0) for name, value in sft["base"].items()}
    assert sft["trained_lines"]["base"] == on_base and sft["trained_lines"]["lines"] == lines["lines"]
    assert sft["trained_lines"]["swept"]["humor"] == {f"{v}": lines["levels"]["humor"].get(f"{v}", 0) for v in range(5)}
    described = "; ".join(
        f"{name}:{value:g} on {on_base[name]:,}" if on_base[name] else f"{name}:{value:g} on **none**"
        for name, value in sft["base"].items()
    )
    shown = md.split(
        f"Of the {lines['lines']:,} attribute lines stage 3 trained on, the base request's values are on: "
    )[1]
    assert [part.split(" (its values")[0] for part in shown.split(".\n")[0].split("; ")] == described.split("; ")
    assert plain["trained_lines"] is None  # plain SFT conditions on nothing
    boot = json.loads((out / "eval/steering_bootstrap.json").read_text())["trained_lines"]
    assert boot["lines"] > lines["lines"]  # stage 3's data and the labelled samples
    timings = json.loads((out / "timings.json").read_text())
    assert timings["reused"] == [] and all(seconds > 0 for seconds in timings["seconds"].values())


@pytest.mark.slow
def test_bootstrap_labels_are_the_apms_predictions_of_what_was_sampled(uninterrupted: Path) -> None:
    from steerlm import runtime
    from steerlm.config import ParallelConfig
    from steerlm.inference.scoring import AttributeScorer

    iteration = uninterrupted / "bootstrap/iter_1"
    labelled = list(read_records(iteration / "labelled.jsonl", DataFormat.conversation, SCHEMA))
    raw = [json.loads(line) for line in (iteration / "samples.jsonl").read_text().splitlines()]
    assert len(raw) == 20  # 10 requests x 2 samples
    answered = [row for row in raw if row["conversations"][-1]["value"].strip()]
    empty = [json.loads(line) for line in (iteration / "empty.jsonl").read_text().splitlines()]
    assert empty == [row for row in raw if not row["conversations"][-1]["value"].strip()]
    summary = json.loads((uninterrupted / "bootstrap/eval.json").read_text())
    assert summary["iterations"][0]["empty_samples"] == len(empty)
    samples = [from_conversation_json(row, SCHEMA, "samples", i) for i, row in enumerate(answered)]
    assert len(labelled) == len(samples) > 0
    assert [c.turns[-1].text for c in labelled] == [c.turns[-1].text for c in samples]
    layout = runtime.initialize(ParallelConfig(), 0)
    try:
        scorer = AttributeScorer.from_checkpoint(uninterrupted / "apm", layout)
        expected = [SCHEMA.clip_round(score) for score in scorer.score(samples)]
    finally:
        runtime.shutdown()
    assert [c.turns[-1].labels for c in labelled] == expected
    rows = [json.loads(line) for line in (uninterrupted / "bootstrap/iter_1/labelled.jsonl").read_text().splitlines()]
    quality = [SCHEMA.parse(row["requested"])["quality"] for row in rows]
    assert len(set(quality)) == 1  # every request asks for the best quality found in the data
    assert (uninterrupted / "bootstrap" / "final").resolve() == (uninterrupted / "bootstrap/iter_1/sft").resolve()


@pytest.mark.slow
def test_bootstrap_at_pp2_samples_and_labels_what_one_process_does(uninterrupted: Path, tmp_path: Path) -> None:
    """Stage 4 with the model split over two pipeline stages (as the 70B presets' launch layouts split it): the
    stage-3 model samples through the lean decoder's pipelined loop, the APM labels, the fine-tune trains at PP=2.
    The samples and their labels are byte for byte those of the pipeline's one-process run."""
    recorded = json.loads((uninterrupted / ".pipeline" / "bootstrap.json").read_text())
    args = [arg for arg in recorded["args"] if not arg.startswith(("output_dir=", "parallel="))]
    result = run_recipe("bootstrap", [*args, f"output_dir={tmp_path}", "parallel=pp2"], TORCHRUN_2, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pp=2" in result.stderr
    for name in ("samples.jsonl", "labelled.jsonl"):
        assert (tmp_path / "iter_1" / name).read_bytes() == (uninterrupted / "bootstrap/iter_1" / name).read_bytes()


@pytest.mark.slow
def test_killed_mid_stage_and_rerun_gives_the_same_report(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        _command(out), cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = out / "sft" / "checkpoints"
    deadline = time.monotonic() + 900
    while not (checkpoints / "latest").exists():  # the SFT stage has saved step 4 and is training on
        assert process.poll() is None and time.monotonic() < deadline, "the pipeline ended before the SFT stage"
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(10)
    stages = subprocess.run(["pgrep", "-f", f"output_dir={out}/sft"], capture_output=True, text=True)
    assert stages.stdout.strip() == "", "a stage outlived the killed pipeline"
    stopped = out / "sft" / "eval.json"  # the stage got SIGTERM: it checkpointed and stopped early, or never wrote
    assert not stopped.exists() or json.loads(stopped.read_text())["stop_reason"]
    done = _run(out)
    assert done.returncode == 0, done.stderr[-4000:]
    log = (out / "logs" / "sft.log").read_text()
    assert "resum" in log.lower()
    for name in REPORT_FILES:
        assert (out / name).read_text().replace(str(out), "OUT") == (uninterrupted / name).read_text().replace(
            str(uninterrupted), "OUT"
        ), name


@pytest.mark.slow
def test_a_stage_restarted_with_other_settings_is_refused(uninterrupted: Path) -> None:
    done = _run(uninterrupted, 'stages.sft=["trainer.max_steps=13"]')
    assert done.returncode != 0
    assert "stages.sft" in done.stderr and "other settings" in done.stderr


@pytest.mark.slow
def test_keep_going_runs_every_stage_that_does_not_need_the_failed_one(uninterrupted: Path) -> None:
    evaluation = uninterrupted / "eval" / "steering_plain.json"  # needs sft_plain, not sft
    expected = evaluation.read_text()
    evaluation.unlink()
    stopped = _run(uninterrupted, 'stages.sft=["trainer.max_steps=13"]')
    assert stopped.returncode != 0 and not evaluation.exists()  # stopped after the failed stage's wave
    going = _run(uninterrupted, 'stages.sft=["trainer.max_steps=13"]', "pipeline.keep_going=true")
    assert going.returncode != 0 and "stages.sft" in going.stderr and "other settings" in going.stderr
    assert "not run (they need a failed stage): bootstrap, steer_sft, steer_bootstrap" in going.stderr
    assert evaluation.read_text() == expected  # evaluated again, the same as before


def test_tp2_runs_every_training_and_inference_stage_under_torchrun(tmp_path: Path) -> None:
    cfg = to_typed(compose("pipeline", [f"output_dir={tmp_path}", "pipeline.parallel=tp2"]), PipelineConfig)
    steps = {step.name: step for step in plan(cfg)}
    assert steps["world"].processes == 1 and steps["world"].command()[1].endswith("prepare_data.py")
    # every world setting but one added later, which a run from before lacks (so it still resumes) unless set
    assert {arg.split("=")[0] for arg in steps["world"].args if arg.startswith("synthetic.")} == {
        f"synthetic.{f.name}" for f in fields(SyntheticConfig) if f.name != "knowledge_errors"
    }
    fixed = replace(cfg, synthetic=replace(cfg.synthetic, knowledge_errors="fixed"))
    assert "synthetic.knowledge_errors=fixed" in {step.name: step for step in plan(fixed)}["world"].args
    for name in ("pretrain", "apm", "annotate", "sft", "bootstrap", "steer_sft"):
        command = steps[name].command()
        assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], name
        assert "parallel=tp2" in command
    assert f"sft.init_from={tmp_path / 'base'}" in steps["sft"].args
    assert "sft.condition_on_attributes=false" in steps["sft_plain"].args
    with pytest.raises(ConfigError) as error:
        plan(replace(cfg, pipeline=replace(cfg.pipeline, parallel="tp3")))
    assert error.value.key == "pipeline.parallel"
    with pytest.raises(ConfigError) as error:
        replace(cfg, stages={"typo": ["a=1"]}).validate()
    assert error.value.key == "stages.typo"
    with pytest.raises(ConfigError) as error:
        replace(cfg, pipeline=replace(cfg.pipeline, threads=0)).validate()
    assert error.value.key == "pipeline.threads"


def test_recipes_exist_for_every_planned_stage(tmp_path: Path) -> None:
    cfg = to_typed(compose("pipeline", [f"output_dir={tmp_path}"]), PipelineConfig)
    for step in plan(cfg):
        assert Path(step.command()[1]).is_file(), step.recipe
    assert os.path.basename(plan(cfg)[-1].command()[1]) == "evaluate_steering.py"


def test_plain_sft_gets_the_sft_stages_data_model_and_training_budget(tmp_path: Path) -> None:
    """The baseline SteerLM is compared with must differ only in not seeing the attributes."""
    cfg = to_typed(compose("pipeline", [f"output_dir={tmp_path}"]), PipelineConfig)
    steps = {step.name: step for step in plan(cfg)}
    sft, plain = (
        to_typed(compose(steps[name].recipe, list(steps[name].args)), SFTConfig) for name in ("sft", "sft_plain")
    )
    assert sft.sft.condition_on_attributes and not plain.sft.condition_on_attributes
    for section in ("model", "trainer", "optim", "data", "tokenizer", "parallel"):
        assert getattr(plain, section) == getattr(sft, section), section
    assert replace(plain.sft, condition_on_attributes=True) == sft.sft


# Which stage's outputs live where, relative to output_dir (the longest matching prefix names the producer).
PRODUCED = {
    "data": "world",
    "data/apm_labels.jsonl": "annotate",
    "base": "pretrain",
    "apm": "apm",
    "judge": "judge",
    "sft": "sft",
    "sft_plain": "sft_plain",
    "bootstrap": "bootstrap",
}


def _producer(relative: str) -> str | None:
    matches = [prefix for prefix in PRODUCED if relative == prefix or relative.startswith(prefix + "/")]
    return PRODUCED[max(matches, key=len)] if matches else None


@pytest.mark.parametrize(
    "judge", [[], ["pipeline.judge=[correctness]", "pipeline.judge_refit=[quality]"], ["route=knowledge"]]
)
def test_each_wave_reads_only_what_earlier_waves_wrote(tmp_path: Path, judge: list[str]) -> None:
    cfg = to_typed(compose("pipeline", [f"output_dir={tmp_path}", *judge]), PipelineConfig)
    steps = plan(cfg)
    grouped = waves(steps, concurrent=True)
    assert [[step.name for step in wave] for wave in grouped] == [
        ["world"],
        ["pretrain"],
        ["apm", "judge"] if judge else ["apm"],
        ["annotate"],
        ["sft", "sft_plain"],
        ["bootstrap"],
        ["steer_sft", "steer_bootstrap", "steer_plain"],
    ]
    done: set[str] = set()
    for wave in grouped:
        for step in wave:
            assert set(step.needs) <= done, step.name
            for arg in step.args:
                key, _, value = arg.partition("=")
                if key.startswith("output") or not value.startswith(str(tmp_path)):
                    continue  # its own outputs, or not a path of the pipeline's
                producer = _producer(str(Path(value).relative_to(tmp_path)))
                assert producer in step.needs, f"{step.name} reads {value} without needing {producer}"
        done |= {step.name for step in wave}
    assert waves(steps, concurrent=False) == [[step] for step in steps]
    # annotation alone writes the same bytes at any data-parallel size (tests/test_annotate.py), so it alone may
    # run its threads as replicas
    assert [step.name for step in steps if step.replicable] == ["annotate"]


def test_the_bayes_judge_is_stage_3s_recipe_on_the_ratings_and_labels_what_it_names(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", "pipeline.judge=[correctness,helpfulness]", "pipeline.judge_refit=[quality]"]
    cfg = to_typed(compose("pipeline", overrides), PipelineConfig)
    steps = {step.name: step for step in plan(cfg)}
    judge = to_typed(compose("train_sft", list(steps["judge"].args)), SFTConfig)
    sft = to_typed(compose("train_sft", list(steps["sft"].args)), SFTConfig)
    assert judge.data.train_file == str(tmp_path / "data" / "annotated.jsonl")
    assert judge.data.format.value == "helpsteer2"
    assert judge.sft == sft.sft and judge.model == sft.model and judge.trainer.max_steps == 9600
    annotate = to_typed(compose("annotate", list(steps["annotate"].args)), AnnotateConfig)
    assert annotate.judge.checkpoint == str(tmp_path / "judge")
    assert annotate.judge.attributes == ["correctness", "helpfulness"] and annotate.judge.refit == ["quality"]
    assert annotate.judge.refit_data == judge.data.train_file and "judge" in steps["annotate"].needs
    bootstrap = to_typed(compose("bootstrap", list(steps["bootstrap"].args)), BootstrapConfig)
    assert bootstrap.bootstrap.judge == annotate.judge and "judge" in steps["bootstrap"].needs
    # without a judge the annotate command is what it was, so run directories made before it still resume
    plain = {step.name: step for step in plan(to_typed(compose("pipeline", overrides[:1]), PipelineConfig))}
    assert "judge" not in plain and not any(arg.startswith("judge.") for arg in plain["annotate"].args)
    assert not any(arg.startswith("bootstrap.judge.") for arg in plain["bootstrap"].args)
    with pytest.raises(ConfigError) as error:
        to_typed(compose("pipeline", [overrides[0], overrides[2]]), PipelineConfig).validate()
    assert error.value.key == "pipeline.judge_refit"
    for bad in (["pipeline.sft_init=judge"], [*overrides[1:], "pipeline.sft_init=apm"]):
        with pytest.raises(ConfigError) as error:
            to_typed(compose("pipeline", [overrides[0], *bad]), PipelineConfig).validate()
        assert error.value.key == "pipeline.sft_init"


def test_the_knowledge_route_is_the_documented_judge_command_and_yields_to_the_command_line(tmp_path: Path) -> None:
    """`route=knowledge` plans exactly the stage commands of the long command docs/pipeline.md measured, so its
    run directories resume either way; its own output_dir keeps it off the default run's records; anything on
    the command line still wins over the route."""
    spelled_out = [
        "synthetic.knowledge_errors=fixed",
        "synthetic.annotated_rows=20000",
        "pipeline.judge=[correctness,helpfulness]",
        "pipeline.judge_refit=[quality]",
        "pipeline.sft_init=judge",
        'stages.sft=["trainer.max_steps=2400"]',
        'stages.sft_plain=["trainer.max_steps=2400"]',
    ]
    out = f"output_dir={tmp_path}"
    route = to_typed(compose("pipeline", ["route=knowledge", out]), PipelineConfig)
    route.validate()
    assert plan(route) == plan(to_typed(compose("pipeline", [out, *spelled_out]), PipelineConfig))
    steps = {step.name: step for step in plan(route)}
    names = ("judge", "sft", "sft_plain")
    trained = {name: to_typed(compose("train_sft", list(steps[name].args)), SFTConfig) for name in names}
    assert {name: run.trainer.max_steps for name, run in trained.items()} == {
        "judge": 9600,
        "sft": 2400,
        "sft_plain": 2400,
    }
    # stage 3 starts from the judge and so waits for it; plain SFT starts from the base LM
    assert trained["sft"].sft.init_from == str(tmp_path / "judge") and "judge" in steps["sft"].needs
    assert trained["sft_plain"].sft.init_from == str(tmp_path / "base") and "judge" not in steps["sft_plain"].needs
    annotate = to_typed(compose("annotate", list(steps["annotate"].args)), AnnotateConfig)
    assert annotate.judge.attributes == ["correctness", "helpfulness"] and annotate.judge.refit == ["quality"]
    assert to_typed(compose("pipeline", ["route=knowledge"]), PipelineConfig).output_dir == "runs/knowledge"
    assert to_typed(compose("pipeline", []), PipelineConfig).output_dir == "runs/pipeline"
    mine = to_typed(
        compose("pipeline", ["route=knowledge", out, 'stages.sft=["trainer.max_steps=12"]', "synthetic.seed=3"]),
        PipelineConfig,
    )
    assert mine.stages["sft"] == ["trainer.max_steps=12"] and mine.stages["sft_plain"] == ["trainer.max_steps=2400"]
    assert mine.synthetic.seed == 3 and mine.synthetic.knowledge_errors == "fixed"


def test_a_resumed_run_keeps_the_stage_times_an_earlier_run_measured() -> None:
    earlier = {"seconds": {"world": 14.0, "pretrain": 0.0, "apm": 75.5, "sft": 900.0, "total": 1200.0}}
    # this run: world and apm found complete, pretrain complete but never timed (an old file's 0.0), sft resumed
    # after a kill (its own time), annotate complete with no earlier time at all
    times = {"world": None, "pretrain": None, "apm": None, "annotate": None, "sft": 30.0}
    seconds, reused = carry_timings(earlier, times)
    assert seconds == {"world": 14.0, "pretrain": None, "apm": 75.5, "annotate": None, "sft": 30.0}
    assert reused == ["world", "apm"]
    assert carry_timings({}, {"world": 3.0, "apm": None}) == ({"world": 3.0, "apm": None}, [])


def test_a_stage_trains_the_same_weights_at_one_and_two_threads(layout, tmp_path: Path) -> None:
    """What lets a wave's stages split the threads without changing a report: 3 steps of the test model give
    bitwise the same weights at 1 and 2 threads, and when the pipeline raises 1 to 2 between two steps (the share
    file a training loop follows, steerlm/runtime/threads.py). Micro-batches of 4,096 tokens, so the weight
    gradients' products reduce over 4,096 terms: MKL's default code paths split that over the threads (this test
    fails under `MKL_CBWR=AUTO` on an Intel Xeon); its strict mode, which recipes run in
    (`parallel.cpu_reproducible`) and so does this session (conftest), does not."""
    from steerlm.config import OptimizerConfig, ParallelConfig, TrainConfig
    from steerlm.runtime.threads import ThreadShare, write_share
    from steerlm.training import build_training, microbatches_for_rank, train_step
    from tests.conftest import TEST_MODEL
    from tests.parity_scenarios import TRAINER, global_batch

    trainer = replace(TRAINER, micro_batch_size=32, global_batch_size=32, seq_length=TEST_MODEL.max_position_embeddings)
    cfg = TrainConfig(model=TEST_MODEL, parallel=ParallelConfig(), trainer=trainer, optim=OptimizerConfig(lr=1e-2))
    weights = []
    before = torch.get_num_threads()
    for schedule in ((1, 1, 1), (2, 2, 2), (1, 2, 2)):
        path = tmp_path / f"{schedule}.threads"
        share = ThreadShare(path, every=0.0)
        try:
            setup = build_training(cfg, layout)
            for step, threads in enumerate(schedule):
                write_share(path, threads)
                share.poll()
                assert torch.get_num_threads() == threads
                batch = global_batch(step, TEST_MODEL, trainer)
                train_step(
                    setup.model,
                    setup.optimizer,
                    setup.scheduler,
                    microbatches_for_rank(batch, trainer.micro_batch_size, layout),
                    layout,
                )
            weights.append([param.detach().clone() for param in setup.chunks[0].parameters()])
        finally:
            torch.set_num_threads(before)
    for other in weights[1:]:
        assert all(torch.equal(one, two) for one, two in zip(weights[0], other))
