"""`recipes/prepare_data.py` as users run it: conversion, summary, rejects, and failure on bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipe_runner import run_recipe

ROWS = [
    {
        "prompt": "Name a colour.",
        "response": "Blue.",
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "complexity": 0,
        "verbosity": 1,
    },
    {
        "prompt": "Bad row",
        "response": "x",
        "helpfulness": 9,
        "correctness": 4,
        "coherence": 4,
        "complexity": 0,
        "verbosity": 1,
    },
    {
        "prompt": "Hi\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nTell a joke.",
        "response": "Why did the GPU cross the road? 🐔",
        "helpfulness": 3,
        "correctness": 4,
        "coherence": 4,
        "complexity": 1,
        "verbosity": 1,
    },
]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "helpsteer2.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    return path


def test_convert_with_rejects_prints_summary_and_histograms(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "train.jsonl"
    result = run_recipe(
        "prepare_data", ["format=helpsteer2_turns", f"input={source}", f"output={output}", "on_bad_row=reject"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows in: 3  conversations out: 2  rejected: 1" in result.stdout
    assert "rejected by field: helpfulness: 1" in result.stdout
    conversations = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [len(c["conversations"]) for c in conversations] == [2, 4]
    last = conversations[1]["conversations"]
    assert [t["from"] for t in last] == ["User", "Assistant", "User", "Assistant"]
    assert last[1]["label"] is None and last[3]["value"].endswith("🐔")
    assert last[3]["label"] == "helpfulness:3,correctness:4,coherence:4,complexity:1,verbosity:1"
    rejects = [json.loads(line) for line in Path(f"{output}.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["source"] == f"{source}:2" and rejects[0]["field"] == "helpfulness"
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert summary["histograms"]["helpfulness"] == {"3": 1, "4": 1}
    assert summary["histograms"]["verbosity"] == {"1": 2}


def test_bad_row_stops_the_conversion_naming_file_line_and_field(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "train.jsonl"
    result = run_recipe("prepare_data", ["format=helpsteer2", f"input={source}", f"output={output}"])
    assert result.returncode != 0
    assert f"{source}:2: field 'helpfulness': helpfulness=9 is outside [0, 4]" in result.stderr
    assert not output.exists()


def test_missing_input_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_recipe("prepare_data", [f"input={tmp_path / 'nope.jsonl'}", f"output={tmp_path / 'o.jsonl'}"])
    assert result.returncode != 0 and "input=" in result.stderr and "no such file" in result.stderr


def test_synthetic_world_through_the_recipe(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = run_recipe(
        "prepare_data",
        [
            "data=synthetic",
            f"output={out}",
            "synthetic.annotated_rows=50",
            "synthetic.unlabelled_rows=100",
            "synthetic.eval_prompts=5",
        ],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "synthetic world seed 0: 60 creatures, 50 annotated rows, 100 unlabelled" in result.stdout
    assert len((out / "unlabelled.jsonl").read_text().splitlines()) == 100
    assert json.loads((out / "summary.json").read_text())["sizes"]["eval_prompts"] == 5
