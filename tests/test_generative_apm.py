"""The generative APM (the SteerLM paper's): it is trained on the attribute string only, reads what it writes
leniently (one bad item costs one attribute, and is counted), learns the synthetic world's surface attributes,
and annotates through the same scoring API as the regression APM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from steerlm.config import ConfigError, compose, to_typed
from steerlm.config.schema import APMConfig, APMType, AttributeModelConfig
from steerlm.data.apm import (
    attribute_examples,
    attribute_string,
    attribute_string_budget,
    generative_examples,
    parse_attribute_string,
)
from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.collate import pad_batch
from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate
from steerlm.evaluation.apm_metrics import attribute_metrics, reward_metrics
from steerlm.tokenizers import WordTokenizer
from tests.recipe_runner import TORCHRUN_2, run_recipe

SCHEMA = AttributeSchema("three", ("helpfulness", "humor", "verbosity"))
# Measured 0.917-0.957 (verbosity … toxicity) on 199 held-out rows; the margin covers sampling error.
GENERATIVE_SURFACE_PEARSON = 0.85
TOKENIZER = WordTokenizer.build(["Owls hunt at night . What do owls do ? helpfulness humor verbosity : , 0 1 2 3 4"])


def test_parse_reads_each_item_on_its_own_and_names_what_it_could_not_read() -> None:
    assert parse_attribute_string(SCHEMA, "helpfulness:4,humor:0,verbosity:2\n") == (
        {"helpfulness": 4.0, "humor": 0.0, "verbosity": 2.0},
        [],
    )
    values, problems = parse_attribute_string(SCHEMA, "helpfulness:4,humor:9,wit:1,verbosity:x,helpfulness:3,humor")
    assert values == {"helpfulness": 4.0}
    assert problems == ["humor:9", "wit:1", "verbosity:x", "helpfulness:3", "humor"]
    assert parse_attribute_string(SCHEMA, "humor:nan,verbosity:inf") == ({}, ["humor:nan", "verbosity:inf"])


def test_examples_train_exactly_the_attribute_string_after_the_apm_prompt() -> None:
    turns = (
        Turn(Role.user, "What do owls do?"),
        Turn(Role.assistant, "Owls hunt at night.", {"helpfulness": 4, "humor": None, "verbosity": 1}),
    )
    template = SteerLMTemplate(SCHEMA)
    [prompt] = attribute_examples(
        [Conversation("", turns, "f:1")], SCHEMA, template, TOKENIZER, 200, LengthPolicy.drop, LengthStats()
    )
    [example] = generative_examples([prompt], SCHEMA, TOKENIZER, template)
    string = TOKENIZER.encode("helpfulness:4,verbosity:1\n")  # the missing label is simply not written
    assert attribute_string(SCHEMA, prompt.targets, "\n") == "helpfulness:4,verbosity:1\n"
    assert example.ids == prompt.ids + tuple(string)
    assert example.trainable == (False,) * len(prompt.ids) + (True,) * len(string)
    batch = pad_batch([example], TOKENIZER.pad_id)
    trained = batch["labels"][0][batch["loss_mask"][0] == 1].tolist()
    assert trained == string and TOKENIZER.decode(prompt.ids).endswith("Owls hunt at night.\n<extra_id_2>")
    assert attribute_string_budget(SCHEMA, TOKENIZER, template) >= len(
        TOKENIZER.encode("helpfulness:4,humor:4,verbosity:4\n")
    )


def test_unwritten_attributes_are_left_out_of_the_metrics_and_counted() -> None:
    predictions = np.array([[4.0, math.nan, 1.0], [3.0, 2.0, math.nan], [1.0, 0.0, 3.0]])
    targets = np.array([[4.0, 1.0, 1.0], [2.0, 2.0, MISSING], [1.0, 1.0, 2.0]])
    metrics = attribute_metrics(predictions, targets, SCHEMA)["attributes"]
    assert metrics["humor"]["count"] == 2 and metrics["humor"]["unpredicted"] == 1
    assert metrics["verbosity"]["count"] == 2 and metrics["verbosity"]["unpredicted"] == 0  # its NaN is unlabelled
    assert metrics["helpfulness"]["mae"] == pytest.approx(1 / 3) and metrics["helpfulness"]["unpredicted"] == 0
    reward = reward_metrics(predictions, targets, [1.0, 0.0, 1.0])  # humor's NaN does not matter at weight 0
    assert reward["count"] == 2 and reward["mae"] == pytest.approx(0.5)


def test_attribute_weights_are_refused_for_a_generative_apm() -> None:
    with pytest.raises(ConfigError, match="apm.attribute_weights"):
        APMConfig(type=APMType.generative, attribute_weights=[1.0, 1.0, 1.0]).validate(SCHEMA)


@pytest.mark.slow
def test_interleaved_pipeline_generative_training_is_refused(tmp_path: Path) -> None:
    overrides = [
        "apm.type=generative",
        "parallel=pp2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "model.num_layers=4",
    ]
    cfg = to_typed(compose("train_attribute_model", overrides), AttributeModelConfig)
    assert cfg.apm.type == APMType.generative
    result = run_recipe(
        "train_attribute_model", [*overrides, "trainer.max_steps=1", f"output_dir={tmp_path}"], launcher=TORCHRUN_2
    )
    assert result.returncode != 0 and "apm.type" in result.stderr, result.stderr[-2000:]
    assert "virtual_pipeline_model_parallel_size" in result.stderr


@pytest.fixture(scope="module")
def generative_apm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generative")
    data, out = root / "synthetic", root / "apm"
    made = run_recipe(
        "prepare_data", ["data=synthetic", f"output={data}", "synthetic.unlabelled_rows=40", "synthetic.eval_prompts=2"]
    )
    assert made.returncode == 0, made.stderr[-2000:]
    trained = run_recipe(
        "train_attribute_model",
        [
            "apm.type=generative",
            f"data.train_file={data}/annotated.jsonl",
            f"tokenizer.path={data}/tokenizer",
            f"output_dir={out}",
            "trainer.eval_interval=null",
            "checkpoint.save_interval=null",
        ],
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return {"data": data, "apm": out, "eval": json.loads((out / "eval.json").read_text())}


@pytest.mark.slow
def test_tiny_generative_apm_learns_the_synthetic_worlds_surface_attributes(generative_apm: dict) -> None:
    metrics = generative_apm["eval"]["metrics"]
    pearson = {name: values["pearson"] for name, values in metrics["attributes"].items()}
    print(
        f"\ngenerative APM held-out Pearson: {pearson} mean {metrics['mean']['pearson']:.3f}; "
        f"generation {metrics['generation']}"
    )
    assert metrics["generation"]["complete"] >= 0.95 * metrics["generation"]["rows"]
    for name in ("verbosity", "humor", "toxicity"):
        assert pearson[name] >= GENERATIVE_SURFACE_PEARSON, f"{name}: {pearson[name]:.3f}"


@pytest.mark.slow
def test_a_generative_apm_trains_at_pp2_and_evaluates_as_one_process_does(generative_apm: dict, tmp_path: Path) -> None:
    """Its held-out evaluation generates through the pipelined decoder: the metrics the PP=2 run writes are those
    one process computes from its checkpoint."""
    data = generative_apm["data"]
    trained = run_recipe(
        "train_attribute_model",
        [
            "apm.type=generative",
            "parallel=pp2",
            f"data.train_file={data}/annotated.jsonl",
            f"tokenizer.path={data}/tokenizer",
            f"output_dir={tmp_path / 'apm'}",
            "trainer.max_steps=30",
            "trainer.eval_interval=null",
            "checkpoint.save_interval=null",
        ],
        TORCHRUN_2,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_recipe(
        "evaluate_attribute_model",
        [
            f"apm_checkpoint={tmp_path / 'apm'}",
            f"input={data}/annotated.jsonl",
            "format=helpsteer2",
            "validation_fraction=0.1",
            f"output_dir={tmp_path / 'eval'}",
        ],
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    at_pp2 = json.loads((tmp_path / "apm" / "eval.json").read_text())["metrics"]
    at_one = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert at_pp2["generation"]["rows"] == at_one["generation"]["rows"] > 0
    assert json.dumps(at_pp2["attributes"], sort_keys=True) == json.dumps(at_one["attributes"], sort_keys=True)


@pytest.mark.slow
def test_annotate_and_evaluate_accept_a_generative_apm(generative_apm: dict, tmp_path: Path) -> None:
    data = generative_apm["data"]
    out = tmp_path / "labelled.jsonl"
    result = run_recipe(
        "annotate", [f"apm_checkpoint={generative_apm['apm']}", f"input={data}/unlabelled.jsonl", f"output={out}"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [turn["label"] for row in rows for turn in row["conversations"] if turn["from"] == "Assistant"]
    assert len(rows) == 40 and all(label is not None for label in labels)
    written = sum(f"{name}:" in label for label in labels for name in ("humor", "verbosity", "toxicity"))
    assert written >= 0.9 * 3 * len(labels)
    evaluated = {}
    for name, launcher, parallel in (("tp1", None, "single"), ("tp2", TORCHRUN_2, "tp2"), ("pp2", TORCHRUN_2, "pp2")):
        result = run_recipe(
            "evaluate_attribute_model",
            [
                f"apm_checkpoint={generative_apm['apm']}",
                f"input={data}/annotated.jsonl",
                "format=helpsteer2",
                "validation_fraction=0.1",
                f"output_dir={tmp_path / name}",
                f"parallel={parallel}",
            ],
            launcher,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        evaluated[name] = json.loads((tmp_path / name / "eval.json").read_text())["metrics"]
    assert evaluated["tp1"] == evaluated["tp2"] == evaluated["pp2"]
    assert evaluated["tp1"]["attributes"] == generative_apm["eval"]["metrics"]["attributes"]
