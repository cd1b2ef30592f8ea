"""The pipeline report's measurement of the Bayes judge: what annotation writes for the rated rows neither the judge
nor the APM trained on, against the human ratings and the oracle. Its own module: the measurement starts and stops
its own process group, so no test here may hold one (tests/test_judge.py's `layout`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from steerlm.config import compose, to_typed
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.schema import AttributeModelConfig
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.sampler import held_out
from steerlm.data.synthetic.splits import SCHEMA
from steerlm.data.synthetic.world import World
from steerlm.stages import attribute_model
from steerlm.stages.pipeline import Paths
from steerlm.stages.report import HELD_OUT_LABELS, labels_held_out


def _run_dir(steerable: dict, root: Path, apm_fraction: float) -> Paths:
    """A pipeline run directory around the steerable world: its ratings, the steerable model as the judge (trained
    with `data.validation_fraction` 0.1) and an APM of a few steps holding out `apm_fraction` of the ratings."""
    out = Paths(root)
    shutil.copytree(steerable["data"], out.data)
    out.judge.symlink_to(steerable["sft"])
    apm = [f"data.train_file={out.data}/annotated.jsonl", f"tokenizer.path={out.data}/tokenizer"]
    apm += [f"output_dir={out.apm}", f"data.validation_fraction={apm_fraction}", "trainer.max_steps=3"]
    apm += ["trainer.global_batch_size=16", "trainer.eval_interval=null"]
    attribute_model.run(to_typed(compose("train_attribute_model", apm), AttributeModelConfig))
    return out


def _held_out_ratings(out: Paths, fraction: float) -> list[dict]:
    rated = out.data / "annotated.jsonl"
    rows = [row for row in read_records(rated, DataFormat.helpsteer2, SCHEMA) if held_out(row.source, fraction)]
    return [row.turns[-1].labels for row in rows]


@pytest.mark.slow
def test_the_judge_is_measured_on_held_out_ratings_given_the_apms_labels_not_the_humans(
    steerable, tmp_path: Path
) -> None:
    """The steerable model follows humor (tests/test_steering.py), so as annotation's judge of humor its labels
    agree with the held-out ratings; only rows neither it (fraction 0.1) nor the APM (0.2) trained on are measured.
    The judge reads the APM's labels of the other attributes, as annotation does for an unlabelled conversation:
    the human ratings of those attributes changed in the rated file change nothing it writes (given the human
    ratings, as the report measured before, rated toxicity 0 everywhere would move every posterior)."""
    out = _run_dir(steerable, tmp_path / "run", apm_fraction=0.2)
    world = World(**json.loads((out.data / "world.json").read_text()))
    cfg = to_typed(compose("pipeline", [f"output_dir={out.root}", "pipeline.judge=[humor]"]), PipelineConfig)

    measured = labels_held_out(cfg, out, world)
    humor = measured["humor"]
    assert list(measured) == ["humor"] and humor["judged"]
    ratings = _held_out_ratings(out, 0.1)  # the judge's 0.1 is the smaller hold-out
    assert humor["rows"] == sum(labels["humor"] is not None for labels in ratings) > 100
    assert humor["pearson"] > 0.9 and humor["pearson_oracle"] > 0.9 and 0.5 < humor["exact_match"] <= 1
    labelled = (out.eval / HELD_OUT_LABELS).read_text()
    rows = [json.loads(line) for line in labelled.splitlines()]
    assert len(rows) == len(ratings)
    assert all(turn["label"] for row in rows for turn in row["conversations"] if turn["from"] == "Assistant")

    rated = out.data / "annotated.jsonl"
    changed = [json.loads(line) | {"toxicity": 0, "verbosity": 4} for line in rated.read_text().splitlines()]
    rated.write_text("".join(json.dumps(row) + "\n" for row in changed))
    again = labels_held_out(cfg, out, world)
    assert (out.eval / HELD_OUT_LABELS).read_text() == labelled and again == measured
