"""The pipeline report's measurement of the Bayes judge: on the rated rows it was not trained on, against the
human ratings and the oracle, cached per checkpoint and attributes. Its own module: the measurement starts and
stops its own process group, so no test here may hold one (tests/test_judge.py's `layout`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerlm.data.readers import DataFormat, read_records
from steerlm.data.sampler import held_out
from steerlm.data.synthetic.splits import SCHEMA
from steerlm.data.synthetic.world import World
from steerlm.stages.report import judge_held_out


@pytest.mark.slow
def test_the_judge_is_measured_on_the_ratings_it_was_not_trained_on(steerable, tmp_path: Path) -> None:
    """The steerable model follows humor (tests/test_steering.py), so judged by Bayes' rule its humor agrees with
    the held-out ratings; the cache is read back, and another list of attributes is measured again."""
    world = World(**json.loads((steerable["data"] / "world.json").read_text()))
    rated, cache = steerable["data"] / "annotated.jsonl", tmp_path / "judge_held_out.json"
    judged = judge_held_out(steerable["sft"], rated, world, ["humor"], cache)["humor"]
    rows = [row for row in read_records(rated, DataFormat.helpsteer2, SCHEMA) if held_out(row.source, 0.1)]
    assert judged["rows"] == sum(row.turns[-1].labels["humor"] is not None for row in rows) > 100
    assert judged["pearson"] > 0.9 and judged["pearson_oracle"] > 0.9 and 0.5 < judged["exact_match"] <= 1

    cached = json.loads(cache.read_text())
    cached["judged"]["humor"]["pearson"] = -2.0  # read back, not measured again
    cache.write_text(json.dumps(cached))
    assert judge_held_out(steerable["sft"], rated, world, ["humor"], cache)["humor"]["pearson"] == -2.0
    again = judge_held_out(steerable["sft"], rated, world, ["toxicity", "humor"], cache)
    assert again["humor"]["pearson"] == pytest.approx(judged["pearson"], abs=1e-6)
    assert again["toxicity"]["pearson"] > 0.9
