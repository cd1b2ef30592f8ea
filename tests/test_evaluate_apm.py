"""`recipes/evaluate_attribute_model.py`: on the rows the APM held out it reproduces the APM's own eval.json,
TP=2 gives the one-rank metrics, training logs per-attribute metrics at every validation, and bad inputs (a
non-APM checkpoint, data rated on another schema, labels out of range) stop before the model is built."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from steerlm.config import ConfigError, compose, to_typed
from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig
from steerlm.data.readers import DataFormat
from steerlm.errors import DataError
from steerlm.stages import attribute_model
from tests.recipe_runner import TORCHRUN_2, run_recipe, synthetic_world, train_apm

MERGE_WEIGHTS = "[0,-0.5,0,0,0.3,0.74,0.46,0.47,-0.33]"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = synthetic_world(
        root / "synthetic", "synthetic.annotated_rows=300", "synthetic.unlabelled_rows=1", "synthetic.eval_prompts=1"
    )
    apm = train_apm(
        data,
        root / "apm",
        "trainer.max_steps=10",
        "trainer.eval_interval=5",
        "trainer.global_batch_size=16",
        f"apm.merge_weights={MERGE_WEIGHTS}",
    )
    return {"data": data, "apm": apm, "root": root}


def _config(world: dict, **changes) -> EvaluateAttributeModelConfig:
    cfg = to_typed(
        compose(
            "evaluate_attribute_model", [f"apm_checkpoint={world['apm']}", f"input={world['data']}/annotated.jsonl"]
        ),
        EvaluateAttributeModelConfig,
    )
    return replace(cfg, output_dir=str(world["root"] / "eval_in_process"), **changes)


def _evaluate(world: dict, output: Path, *extra: str, launcher=None) -> dict:
    result = run_recipe(
        "evaluate_attribute_model",
        [
            f"apm_checkpoint={world['apm']}",
            f"input={world['data']}/annotated.jsonl",
            "format=helpsteer2",
            f"output_dir={output}",
            *extra,
        ],
        launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean Pearson" in result.stderr and "reward" in result.stderr  # the logged table
    return json.loads((output / "eval.json").read_text())


@pytest.mark.slow
def test_held_out_rows_reproduce_the_apm_eval_json_and_tp2_agrees(world, tmp_path: Path) -> None:
    trained = json.loads((world["apm"] / "eval.json").read_text())
    held_out = _evaluate(world, tmp_path / "one", "validation_fraction=0.1")
    assert held_out["examples"] == trained["validation_examples"] > 0
    same = json.dumps(held_out["metrics"]) == json.dumps(trained["metrics"])  # NaN-safe exact equality
    assert same  # same examples, same batches: the same numbers
    assert held_out["merge_weights"][1] == -0.5 and held_out["metrics"]["reward"]["count"] > 0

    tp2 = _evaluate(world, tmp_path / "tp2", "parallel=tp2", launcher=TORCHRUN_2)
    one = _evaluate(world, tmp_path / "all")
    assert tp2["layout"].startswith("world=2 tp=2") and tp2["examples"] == one["examples"] > held_out["examples"]
    for name, values in one["metrics"]["attributes"].items():
        for metric in ("mae", "rmse", "pearson"):
            assert tp2["metrics"]["attributes"][name][metric] == pytest.approx(values[metric], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_training_logs_per_attribute_metrics_at_each_validation(world) -> None:
    rows = [json.loads(line) for line in (world["apm"] / "metrics.jsonl").read_text().splitlines()]
    validations = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in validations] == [5, 10]
    for name in ("humor", "verbosity", "mean", "reward"):
        assert {f"val_pearson/{name}", f"val_mae/{name}"} <= set(validations[-1])
    final = json.loads((world["apm"] / "eval.json").read_text())["metrics"]
    assert validations[-1]["val_pearson/humor"] == pytest.approx(
        final["attributes"]["humor"]["pearson"], rel=0, nan_ok=True
    )
    assert validations[-1]["val_mae/reward"] == final["reward"]["mae"]


@pytest.mark.slow
def test_bad_inputs_stop_before_the_model_is_built(world, tmp_path: Path) -> None:
    lm = tmp_path / "lm" / "checkpoints" / "step_0000001"  # a checkpoint without an apm section
    lm.mkdir(parents=True)
    (lm / "steerlm_checkpoint.json").write_text("{}")
    (lm / "config.yaml").write_text("model:\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as error:
        attribute_model.evaluate(_config(world, apm_checkpoint=str(lm)))
    assert error.value.key == "apm_checkpoint" and "is not an attribute model" in str(error.value)

    row = {
        "prompt": "what does zog eat",
        "response": "figs",
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "complexity": 1,
        "verbosity": 1,
        "violence": 2,
    }
    rated = tmp_path / "rated.jsonl"
    rated.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError) as error:  # a rating column the APM's schema lacks
        attribute_model.evaluate(_config(world, input=str(rated)))
    assert error.value.key == "apm_checkpoint" and f"{rated}:1 rates violence" in str(error.value)

    labelled = tmp_path / "labelled.jsonl"
    turns = [{"from": "User", "value": "zog", "label": None}, {"from": "Assistant", "value": "figs", "label": None}]
    rows = [
        {"conversations": turns},
        {"conversations": [turns[0], {**turns[1], "label": "wit:3"}]},
        {"conversations": [turns[0], {**turns[1], "label": "humor:9"}]},
    ]
    for bad, problem in (
        (rows[1], "unknown attribute 'wit' for schema 'steerlm_oasst'"),
        (rows[2], "humor=9.0 is outside [0, 4]"),
    ):
        labelled.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError) as error:
            attribute_model.evaluate(_config(world, input=str(labelled), format=DataFormat.conversation))
        assert error.value.location == f"{labelled}:2" and problem in str(error.value)
    labelled.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ConfigError) as error:
        attribute_model.evaluate(_config(world, input=str(labelled), format=DataFormat.conversation))
    assert error.value.key == "input" and "holds no assistant turn labelled" in str(error.value)


def test_config_composes_and_validates(tmp_path: Path) -> None:
    (tmp_path / "apm").mkdir()
    (tmp_path / "data.jsonl").write_text("")
    cfg = to_typed(
        compose(
            "evaluate_attribute_model",
            [f"apm_checkpoint={tmp_path / 'apm'}", f"input={tmp_path / 'data.jsonl'}", "parallel=tp2"],
        ),
        EvaluateAttributeModelConfig,
    )
    cfg.validate()
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.validation_fraction is None
    for change, key in (
        ({"validation_fraction": 1.5}, "validation_fraction"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"input": str(tmp_path / "none.jsonl")}, "input"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(cfg, **change).validate()
        assert error.value.key == key
