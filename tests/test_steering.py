"""Steering works end to end: a tiny SFT model of the synthetic world, asked for verbosity 0 vs 4 (or humor,
toxicity), answers with measurably less vs more of it; the evaluation recipe refuses bad requests by key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from steerlm.config import ConfigError, compose, to_typed
from steerlm.config.sft import SFTConfig
from steerlm.config.steering import SteeringEvalConfig
from steerlm.data.attribute_lines import AttributeLines, trained_attribute_lines
from steerlm.data.attributes import AttributeSchema
from steerlm.errors import DataError
from steerlm.stages.evaluate_steering import trained_lines_report
from tests.recipe_runner import run_recipe


def _schema(option: str) -> AttributeSchema:
    return to_typed(compose("train_sft", [f"attributes={option}"]), SFTConfig).attributes.schema()


def test_shipped_config_composes_and_resolves_for_the_synthetic_schema(tmp_path: Path) -> None:
    prompts, world = tmp_path / "p.jsonl", tmp_path / "w.json"
    prompts.write_text("")
    world.write_text("{}")
    cfg = to_typed(compose("evaluate_steering", [f"prompts={prompts}", f"world={world}"]), SteeringEvalConfig)
    cfg.validate()
    sweep, levels, base = cfg.resolve(_schema("steerlm_oasst"))
    assert len(sweep) == 9 and levels == [0.0, 1.0, 2.0, 3.0, 4.0]
    # the base is the schema's best response: quality, helpfulness, correctness, coherence high, the OASST style
    # attributes off, complexity and verbosity moderate (Nemotron-4-340B-Reward's documented HelpSteer2 default)
    assert base == dict(quality=4.0, toxicity=0.0, humor=0.0, creativity=0.0, helpfulness=4.0, correctness=4.0,
                        coherence=4.0, complexity=2.0, verbosity=2.0)  # fmt: skip
    helpsteer2 = dict(helpfulness=4.0, correctness=4.0, coherence=4.0, complexity=2.0, verbosity=2.0)
    assert cfg.resolve(_schema("helpsteer2"))[2] == helpsteer2
    cfg.base = {"verbosity": 4, "humor": 1}  # base.NAME overrides one default
    assert cfg.resolve(_schema("steerlm_oasst"))[2] == {**base, "verbosity": 4.0, "humor": 1.0}
    # as the docs write it on the command line
    overrides = [f"prompts={prompts}", f"world={world}", "+base.verbosity=4", "+base.humor=1"]
    typed = to_typed(compose("evaluate_steering", overrides), SteeringEvalConfig)
    assert typed.resolve(_schema("steerlm_oasst"))[2] == {**base, "verbosity": 4.0, "humor": 1.0}
    cfg.base = {"quality": 4}
    with pytest.raises(ConfigError, match="base.quality.*not an attribute"):
        cfg.resolve(_schema("helpsteer2"))
    cfg.base = {"a": 1}
    with pytest.raises(ConfigError, match="base.b.*no default"):
        cfg.resolve(AttributeSchema("mine", ("a", "b")))


@pytest.fixture(scope="module")
def sweep(steerable: dict, tmp_path_factory) -> dict:
    data, out = steerable["data"], tmp_path_factory.mktemp("steering") / "eval.json"
    result = run_recipe(
        "evaluate_steering",
        [
            f"checkpoint={steerable['sft']}",
            f"prompts={data}/eval_prompts.jsonl",
            f"world={data}/world.json",
            "sweep=[verbosity,humor,toxicity]",
            "values=[0,4]",
            "num_prompts=40",
            f"output={out}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verbosity" in result.stdout and "spearman" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_requesting_verbosity_4_instead_of_0_gives_longer_more_elaborate_answers(sweep: dict) -> None:
    verbosity = sweep["attributes"]["verbosity"]
    low, high = verbosity["levels"]["0"], verbosity["levels"]["4"]
    assert sweep["prompts"] == 40
    assert high["mean_words"] > low["mean_words"] + 3, (low["mean_words"], high["mean_words"])
    assert verbosity["measured_change"] >= 1.0 and verbosity["spearman"] > 0.4


def test_a_base_value_no_trained_line_carries_is_named(caplog: pytest.LogCaptureFixture) -> None:
    lines = AttributeLines(10, {"quality": {"2": 6, "3": 4}, "humor": {"0": 7, "4": 3}})
    with caplog.at_level(logging.WARNING):
        report = trained_lines_report(lines, {"quality": 4.0, "humor": 0.0}, ["humor"], [0.0, 2.0, 4.0])
    assert report == {"lines": 10, "base": {"quality": 0, "humor": 7}, "swept": {"humor": {"0": 7, "2": 0, "4": 3}}}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "quality:4 is on none of the 10 attribute lines" in warned[0]
    assert "its quality values there: 2, 3" in warned[0]
    assert trained_lines_report(None, {"quality": 4.0}, [], [0.0]) is None


def test_the_lines_are_read_from_the_run_of_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "sft"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    assert trained_attribute_lines(run) is None  # the plain-SFT baseline, or a run from before the lines
    (run / "attribute_lines.json").write_text(json.dumps({"lines": 3, "levels": {"humor": {"1": 3}}}))
    expected = AttributeLines(3, {"humor": {"1": 3}})
    assert trained_attribute_lines(run) == trained_attribute_lines(run / "checkpoints" / "step_0000004") == expected
    (run / "attribute_lines.json").write_text('{"lines": 3}')
    with pytest.raises(DataError, match="attribute_lines.json.*not a lines/levels record"):
        trained_attribute_lines(run)


@pytest.mark.slow
def test_the_evaluation_reports_what_the_checkpoint_trained_on(steerable: dict, sweep: dict) -> None:
    recorded = json.loads((steerable["sft"] / "eval.json").read_text())["attribute_lines"]
    assert json.loads((steerable["sft"] / "attribute_lines.json").read_text()) == recorded
    assert sweep["trained_lines"]["lines"] == recorded["lines"] > 1500  # the 2,000 rated rows less the held-out
    for name in ("verbosity", "humor", "toxicity"):
        assert sweep["trained_lines"]["swept"][name] == {v: recorded["levels"][name].get(v, 0) for v in ("0", "4")}


@pytest.mark.slow
@pytest.mark.parametrize("attribute", ["humor", "toxicity"])
def test_other_attributes_steer_in_the_requested_direction(sweep: dict, attribute: str) -> None:
    report = sweep["attributes"][attribute]
    assert report["levels"]["0"]["mean_measured"] < 1.0 < report["levels"]["4"]["mean_measured"]
    assert report["spearman"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key",
    [
        ("sweep=[wit]", "sweep"),
        ("+base.humor=null", "base.humor"),
        ("values=[0,9]", "values"),
        ("prompts=/nonexistent.jsonl", "prompts"),
    ],
)
def test_bad_requests_name_their_key(steerable: dict, override: str, key: str, tmp_path: Path) -> None:
    result = run_recipe(
        "evaluate_steering",
        [
            f"checkpoint={steerable['sft']}",
            f"world={steerable['data']}/world.json",
            f"prompts={steerable['data']}/eval_prompts.jsonl",
            override,
            f"output={tmp_path}/eval.json",
        ],
    )
    assert result.returncode != 0
    assert key in result.stderr, result.stderr[-1500:]
