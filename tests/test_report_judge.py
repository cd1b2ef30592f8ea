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
    the held-out ratings; only rows neither it (fraction 0.1) nor the APM trained on are measured; the cache is read
    back, and another list of attributes or another hold-out is measured again."""
    world = World(**json.loads((steerable["data"] / "world.json").read_text()))
    rated, cache = steerable["data"] / "annotated.jsonl", tmp_path / "judge_held_out.json"

    def rows_rated(fraction: float) -> int:
        rows = [row for row in read_records(rated, DataFormat.helpsteer2, SCHEMA) if held_out(row.source, fraction)]
        return sum(row.turns[-1].labels["humor"] is not None for row in rows)

    judged = judge_held_out(steerable["sft"], rated, world, ["humor"], cache, apm_fraction=0.2)["humor"]
    assert judged["rows"] == rows_rated(0.1) > 100  # the judge's own 0.1 is the smaller hold-out
    assert judged["pearson"] > 0.9 and judged["pearson_oracle"] > 0.9 and 0.5 < judged["exact_match"] <= 1

    cached = json.loads(cache.read_text())
    cached["judged"]["humor"]["pearson"] = -2.0  # read back, not measured again
    cache.write_text(json.dumps(cached))
    read_back = judge_held_out(steerable["sft"], rated, world, ["humor"], cache, apm_fraction=0.1)
    assert read_back["humor"]["pearson"] == -2.0
    again = judge_held_out(steerable["sft"], rated, world, ["toxicity", "humor"], cache, apm_fraction=0.1)
    assert again["humor"]["pearson"] == pytest.approx(judged["pearson"], abs=1e-6)
    assert again["toxicity"]["pearson"] > 0.9
    fewer = judge_held_out(steerable["sft"], rated, world, ["humor"], cache, apm_fraction=0.05)["humor"]
    assert fewer["rows"] == rows_rated(0.05) < judged["rows"]  # the APM trained on some of the judge's rows
