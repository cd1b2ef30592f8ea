"""The regression APM: missing labels give no gradient, metrics are right, examples are what the model
reads, and on the synthetic world a tiny APM learns the surface attributes in a few CPU minutes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlm.config import PrecisionConfig
from steerlm.data.apm import attribute_batch, attribute_examples
from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.collate import LengthPolicy, LengthStats
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate
from steerlm.evaluation.apm_metrics import attribute_metrics
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.tokenizers import WordTokenizer
from steerlm.training.losses import ATTRIBUTE_REGRESSION
from tests.conftest import TEST_MODEL
from tests.recipe_runner import run_recipe

SCHEMA = AttributeSchema("three", ("a", "b", "c"))
MODEL = TEST_MODEL


def test_missing_labels_contribute_no_gradient(layout) -> None:
    model = build_attribute_model_chunks(MODEL, PrecisionConfig(), layout, 1, 3)[0]
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (4, 3), generator=generator).float()
    targets[:, 1] = MISSING  # attribute b unlabelled everywhere
    targets[2, 0] = MISSING
    batch = {"tokens": torch.randint(0, 300, (4, 20), generator=generator),
             "position_ids": torch.arange(20).expand(4, 20), "score_index": torch.tensor([19, 5, 12, 0]),
             "targets": targets}
    loss_sum, count, _ = ATTRIBUTE_REGRESSION.loss(batch, ATTRIBUTE_REGRESSION.forward(model, batch))
    assert int(count) == 4 * 3 - 4 - 1
    loss_sum.backward()
    head = model.attribute_head
    assert torch.count_nonzero(head.weight.grad[1]) == 0 and head.bias.grad[1] == 0
    assert torch.count_nonzero(head.weight.grad[0]) > 0 and torch.count_nonzero(head.weight.grad[2]) > 0


def test_examples_read_the_rated_turn_and_keep_its_end_when_truncated() -> None:
    labels = SCHEMA.check({"a": 3, "c": 1})
    conversation = Conversation("S", (Turn(Role.user, "q one"), Turn(Role.assistant, "r one", labels),
                                      Turn(Role.user, "q two"), Turn(Role.assistant, "r two", labels)), "f:1")
    template = SteerLMTemplate(SCHEMA)
    tokenizer = WordTokenizer.build([template.render(conversation)])
    stats = LengthStats()
    examples = attribute_examples([conversation], SCHEMA, template, tokenizer, 100, LengthPolicy.drop, stats)
    assert [tokenizer.decode(e.ids[1:]).split("\n")[-2:] for e in examples] == [["r one", "<extra_id_2>"],
                                                                                ["r two", "<extra_id_2>"]]
    assert examples[0].targets == (3.0, MISSING, 1.0)
    short = attribute_examples([conversation], SCHEMA, template, tokenizer, 8, LengthPolicy.truncate, stats)
    assert all(len(e.ids) == 8 and tokenizer.decode(e.ids).endswith("<extra_id_2>") for e in short)
    assert attribute_examples([conversation], SCHEMA, template, tokenizer, 8, LengthPolicy.drop, stats) == []
    assert stats.truncated == 2 and stats.dropped["longer than seq_length"] == 2
    batch = attribute_batch(examples, tokenizer.pad_id)
    assert batch["score_index"].tolist() == [len(examples[0].ids) - 1, len(examples[1].ids) - 1]


def test_metrics_on_known_values() -> None:
    targets = np.array([[0, 1, MISSING], [1, 2, 4], [2, 3, 4], [3, 4, MISSING]], dtype=float)
    predictions = np.array([[0.2, 1, 3.6], [0.9, 2, 3.0], [2.4, 3, 4.4], [2.9, 4, 0.0]])
    metrics = attribute_metrics(predictions, targets, SCHEMA)["attributes"]
    assert metrics["a"]["mae"] == pytest.approx(np.mean([0.2, 0.1, 0.4, 0.1]))
    assert metrics["a"]["exact_match"] == 1.0 and metrics["b"]["pearson"] == pytest.approx(1.0)
    assert metrics["c"]["count"] == 2 and metrics["c"]["exact_match"] == 0.5
    assert metrics["c"]["rmse"] == pytest.approx(np.sqrt((1.0 + 0.16) / 2))


@pytest.mark.slow
def test_tiny_apm_learns_the_synthetic_world(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"  # the default world, so vocabulary and held-out rows equal `make demo`'s
    result = run_recipe("prepare_data", ["data=synthetic", f"output={data}"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "apm"
    result = run_recipe("train_attribute_model", [
        f"data.train_file={data}/annotated.jsonl", f"tokenizer.path={data}/tokenizer", f"output_dir={out}"],
        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    pearson = {name: values["pearson"] for name, values in metrics["attributes"].items()}
    print(f"\nheld-out Pearson vs noisy labels: {pearson} mean {metrics['mean']['pearson']:.3f}")
    for name in ("verbosity", "humor", "toxicity", "complexity"):
        assert pearson[name] >= 0.9, f"{name}: {pearson[name]:.3f}"
    assert metrics["mean"]["pearson"] >= 0.6


@pytest.mark.slow
def test_resuming_an_apm_with_another_schema_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"
    assert run_recipe("prepare_data", ["data=synthetic", f"output={data}", "synthetic.annotated_rows=64",
                                       "synthetic.unlabelled_rows=1", "synthetic.eval_prompts=1"]).returncode == 0
    common = [f"data.train_file={data}/annotated.jsonl", f"tokenizer.path={data}/tokenizer",
              f"output_dir={tmp_path / 'apm'}", "trainer.max_steps=2"]
    first = run_recipe("train_attribute_model", common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_recipe("train_attribute_model", [*common, "attributes=helpsteer2", "trainer.max_steps=4"])
    assert second.returncode != 0
    assert "attributes.attributes=['helpfulness'" in second.stderr
    assert "was trained for the attributes ['quality', 'toxicity'" in second.stderr
