"""The regression APM: missing labels give no gradient, metrics are right, examples are what the model
reads, the merged reward adds up, init_from loads a language model's or an APM's weights (refusing other
shapes and schemas), bad inputs name their file:line or key, and on the synthetic world a tiny APM learns the
surface attributes in a few CPU minutes."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlm.checkpoint.sharded import save_checkpoint
from steerlm.config import AttributeModelConfig, AttributesConfig, ConfigError, PrecisionConfig, TrainConfig
from steerlm.config.schema import APMConfig, TokenizerConfig, TrainDataConfig
from steerlm.data.apm import attribute_batch, attribute_examples
from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.data.readers import DataFormat
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate
from steerlm.errors import DataError
from steerlm.evaluation.apm_metrics import attribute_metrics, metric_scalars, reward_metrics
from steerlm.inference.scoring import AttributeScorer
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.attribute_model import load_examples
from steerlm.tokenizers import WordTokenizer
from steerlm.training import build_training
from steerlm.training.init_from import load_init_weights, resolve_init_source
from steerlm.training.losses import ATTRIBUTE_REGRESSION
from tests.conftest import TEST_MODEL
from tests.recipe_runner import run_recipe, synthetic_world

SCHEMA = AttributeSchema("three", ("a", "b", "c"))
MODEL = TEST_MODEL


def test_missing_labels_contribute_no_gradient(layout) -> None:
    model = build_attribute_model_chunks(MODEL, PrecisionConfig(), layout, 1, 3)[0]
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (4, 3), generator=generator).float()
    targets[:, 1] = MISSING  # attribute b unlabelled everywhere
    targets[2, 0] = MISSING
    batch = {
        "tokens": torch.randint(0, 300, (4, 20), generator=generator),
        "position_ids": torch.arange(20).expand(4, 20),
        "score_index": torch.tensor([19, 5, 12, 0]),
        "targets": targets,
    }
    loss_sum, count, _ = ATTRIBUTE_REGRESSION.loss(batch, ATTRIBUTE_REGRESSION.forward(model, batch))
    assert int(count) == 4 * 3 - 4 - 1
    loss_sum.backward()
    head = model.attribute_head
    assert torch.count_nonzero(head.weight.grad[1]) == 0 and head.bias.grad[1] == 0
    assert torch.count_nonzero(head.weight.grad[0]) > 0 and torch.count_nonzero(head.weight.grad[2]) > 0


def test_examples_read_the_rated_turn_and_keep_its_end_when_truncated() -> None:
    labels = SCHEMA.check({"a": 3, "c": 1})
    conversation = Conversation(
        "S",
        (
            Turn(Role.user, "q one"),
            Turn(Role.assistant, "r one", labels),
            Turn(Role.user, "q two"),
            Turn(Role.assistant, "r two", labels),
        ),
        "f:1",
    )
    template = SteerLMTemplate(SCHEMA)
    tokenizer = WordTokenizer.build([template.render(conversation)])
    stats = LengthStats()
    examples = attribute_examples([conversation], SCHEMA, template, tokenizer, 100, LengthPolicy.drop, stats)
    assert [tokenizer.decode(e.ids[1:]).split("\n")[-2:] for e in examples] == [
        ["r one", "<extra_id_2>"],
        ["r two", "<extra_id_2>"],
    ]
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


def test_reward_is_the_weighted_sum_of_the_raw_scores(layout) -> None:
    labels = SCHEMA.check({"a": 3, "b": 1, "c": 4})
    conversations = [
        Conversation("S", (Turn(Role.user, f"q {i}"), Turn(Role.assistant, "r " * (i + 1), labels)), f"f:{i}")
        for i in range(5)
    ]
    template = SteerLMTemplate(SCHEMA)
    tokenizer = WordTokenizer.build([template.render(c) for c in conversations])
    model = build_attribute_model_chunks(MODEL, PrecisionConfig(), layout, 1, 3)
    weights = [0.5, 0.0, -2.0]
    scorer = AttributeScorer(model, layout, SCHEMA, tokenizer, seq_length=64, merge_weights=weights)
    rows = scorer.score(conversations)
    for row in rows:
        assert row["reward"] == pytest.approx(0.5 * row["a"] - 2.0 * row["c"], rel=1e-12, abs=1e-12)
    assert list(rows[0]) == ["a", "b", "c", "reward"]
    plain = AttributeScorer(model, layout, SCHEMA, tokenizer, seq_length=64).score(conversations)
    assert plain == [{k: v for k, v in row.items() if k != "reward"} for row in rows]
    uniform = APMConfig(merge_attributes=True).reward_weights(SCHEMA)  # NeMo-Aligner's default: 1/k each
    assert uniform == [1 / 3] * 3 and APMConfig().reward_weights(SCHEMA) is None
    averaged = AttributeScorer(model, layout, SCHEMA, tokenizer, seq_length=64, merge_weights=uniform).score(
        conversations
    )
    assert [row["reward"] for row in averaged] == pytest.approx([(r["a"] + r["b"] + r["c"]) / 3 for r in plain])
    with pytest.raises(DataError, match="longer than seq_length=4"):
        AttributeScorer(model, layout, SCHEMA, tokenizer, seq_length=4, length_policy=LengthPolicy.drop).score(
            conversations
        )


def test_reward_metrics_on_known_values() -> None:
    targets = np.array([[1, MISSING, 2], [2, 0, 4], [MISSING, 1, 0], [4, 1, 1]], dtype=float)
    predictions = np.array([[1.0, 9.0, 2.5], [2.0, 0.0, 3.0], [7.0, 1.0, 0.0], [3.0, 1.0, 1.0]])
    reward = reward_metrics(predictions, targets, [1.0, 0.0, 2.0])  # rows 0, 1, 3 have a and c labelled
    assert reward["count"] == 3
    predicted, expected = np.array([6.0, 8.0, 5.0]), np.array([5.0, 10.0, 6.0])
    assert reward["mae"] == pytest.approx(np.abs(predicted - expected).mean())
    assert reward["pearson"] == pytest.approx(np.corrcoef(predicted, expected)[0, 1])
    assert reward["mean_predicted"] == pytest.approx((6 + 8 + 7 + 5) / 4)
    scalars = metric_scalars({**attribute_metrics(predictions, targets, SCHEMA), "reward": reward})
    assert scalars["pearson/reward"] == reward["pearson"] and "mae/mean" in scalars and "pearson/b" in scalars


@pytest.mark.parametrize(
    "weights,problem",
    [
        ([1.0, 2.0], "needs one weight per attribute of schema 'three' (3: a, b, c)"),
        ([0.0, 0.0, 0.0], "all weights are 0"),
        ([1.0, float("nan"), 0.0], "must be finite"),
    ],
)
def test_bad_merge_weights_name_the_key(weights: list, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        APMConfig(merge_weights=weights).validate(SCHEMA)
    assert error.value.key == "apm.merge_weights" and problem in str(error.value)
    with pytest.raises(ConfigError) as error:
        APMConfig(attribute_weights=[1.0]).validate(SCHEMA)
    assert error.value.key == "apm.attribute_weights" and "give 3 weights in the order a, b, c" in str(error.value)


@pytest.mark.parametrize(
    "row,field,problem",
    [
        ({"prompt": "q", "response": "r", "attributes": {"a": 7}}, "attributes.a", "a=7 is outside [0, 4]"),
        ({"prompt": "q", "response": "r", "attributes": {"a": 1, "d": 2}}, "attributes.d", "unknown attribute 'd'"),
    ],
)
def test_bad_labels_name_file_line_and_field(tmp_path: Path, row: dict, field: str, problem: str) -> None:
    good = {"prompt": "q", "response": "r", "attributes": {"a": 1}}
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (good, row)) + "\n")
    cfg = _apm_config(tmp_path, train_file=str(data))
    with pytest.raises(DataError) as error:
        load_examples(cfg, SCHEMA, WordTokenizer.build(["q r"]))
    assert error.value.location == f"{data}:2" and error.value.field == field and problem in str(error.value)


def _apm_config(tmp_path: Path, attributes: tuple[str, ...] = ("a", "b", "c"), **data) -> AttributeModelConfig:
    return AttributeModelConfig(
        model=TEST_MODEL,
        output_dir=str(tmp_path / "run"),
        attributes=AttributesConfig(name="three", attributes=list(attributes)),
        tokenizer=TokenizerConfig(path=str(tmp_path)),
        data=TrainDataConfig(format=DataFormat.plain, **{"train_file": "x.jsonl", **data}),
    )


def _saved(layout, cfg: TrainConfig, apm: bool, step: int = 1):
    """A checkpoint of `cfg` (an LM, or an APM with the schema's head) at `cfg.output_dir`; its setup."""
    provider = partial(build_attribute_model_chunks, num_attributes=3) if apm else None
    setup = build_training(cfg, layout, **({"model_provider": provider} if apm else {}))
    save_checkpoint(Path(cfg.output_dir), step, setup, layout, cfg)
    return setup


def _parameters(chunks: list) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in named_global_parameters(chunks)}


def test_apm_init_from_a_language_model_and_from_an_apm(layout, tmp_path: Path) -> None:
    lm = _parameters(_saved(layout, TrainConfig(model=TEST_MODEL, output_dir=str(tmp_path / "lm")), False).chunks)
    cfg = replace(_apm_config(tmp_path), trainer=replace(_apm_config(tmp_path).trainer, seed=77))
    source = resolve_init_source("apm.init_from", str(tmp_path / "lm"), TEST_MODEL, SCHEMA)
    assert source is not None and not source.has_head
    setup = build_training(cfg, layout, model_provider=partial(build_attribute_model_chunks, num_attributes=3))
    fresh = _parameters(setup.chunks)
    load_init_weights(source, setup, layout, TEST_MODEL)
    loaded = _parameters(setup.chunks)
    assert {n for n in loaded if n.startswith("attribute_head.")} == {"attribute_head.weight", "attribute_head.bias"}
    for name, tensor in loaded.items():  # the backbone is the LM's before step 1; the head starts fresh
        assert torch.equal(tensor, fresh[name] if name.startswith("attribute_head.") else lm[name]), name

    apm_cfg = replace(cfg, output_dir=str(tmp_path / "apm"))
    apm = _parameters(_saved(layout, apm_cfg, True).chunks)
    source = resolve_init_source("apm.init_from", str(tmp_path / "apm"), TEST_MODEL, SCHEMA)
    assert source.has_head
    setup = build_training(
        replace(cfg, trainer=replace(cfg.trainer, seed=5)),
        layout,
        model_provider=partial(build_attribute_model_chunks, num_attributes=3),
    )
    load_init_weights(source, setup, layout, TEST_MODEL)
    assert all(torch.equal(tensor, apm[name]) for name, tensor in _parameters(setup.chunks).items())

    with pytest.raises(ConfigError) as error:  # another schema's head
        resolve_init_source("apm.init_from", str(tmp_path / "apm"), TEST_MODEL, AttributeSchema("x", ("a", "b", "z")))
    assert error.value.key == "apm.init_from" and "is an APM for the attributes ['a', 'b', 'c']" in str(error.value)
    with pytest.raises(ConfigError) as error:  # another model shape
        resolve_init_source("apm.init_from", str(tmp_path / "lm"), replace(TEST_MODEL, num_layers=3), SCHEMA)
    assert error.value.key == "model.num_layers" and "set model.num_layers=2" in str(error.value)
    with pytest.raises(ConfigError, match="is neither a checkpoint"):
        resolve_init_source("apm.init_from", str(tmp_path), TEST_MODEL, SCHEMA)


@pytest.mark.slow
def test_tiny_apm_learns_the_synthetic_world(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"  # the default world, so vocabulary and held-out rows equal `make demo`'s
    result = run_recipe("prepare_data", ["data=synthetic", f"output={data}"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "apm"
    result = run_recipe(
        "train_attribute_model",
        [
            f"data.train_file={data}/annotated.jsonl",
            f"tokenizer.path={data}/tokenizer",
            f"output_dir={out}",
            # a third of the recipe's 600 steps: the surface attributes are learnt by then (measured 2026-12-01,
            # 2 CPU cores: Pearson 0.967-0.977 on the five after 200 steps)
            "trainer.max_steps=200",
            "trainer.eval_interval=null",
            "checkpoint.save_interval=null",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    pearson = {name: values["pearson"] for name, values in metrics["attributes"].items()}
    print(f"\nheld-out Pearson vs noisy labels: {pearson} mean {metrics['mean']['pearson']:.3f}")
    # The surface attributes are readable from the response alone; knowledge attributes need facts a model trained
    # from scratch on 1,800 ratings does not have (the pipeline's APM starts from the base LM for them).
    for name in ("toxicity", "humor", "creativity", "complexity", "verbosity"):
        assert pearson[name] >= 0.95, f"{name}: {pearson[name]:.3f}"


@pytest.mark.slow
def test_resuming_an_apm_with_another_schema_is_refused(tmp_path: Path) -> None:
    data = synthetic_world(
        tmp_path / "synthetic", "synthetic.annotated_rows=64", "synthetic.unlabelled_rows=1", "synthetic.eval_prompts=1"
    )
    common = [
        f"data.train_file={data}/annotated.jsonl",
        f"tokenizer.path={data}/tokenizer",
        f"output_dir={tmp_path / 'apm'}",
        "trainer.max_steps=2",
    ]
    first = run_recipe("train_attribute_model", common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_recipe("train_attribute_model", [*common, "attributes=helpsteer2", "trainer.max_steps=4"])
    assert second.returncode != 0
    assert "attributes.attributes=['helpfulness'" in second.stderr
    assert "was trained for the attributes ['quality', 'toxicity'" in second.stderr


@pytest.mark.slow
def test_recipe_starts_from_a_language_model_checkpoint_and_from_hf(layout, tmp_path: Path) -> None:
    from tests.test_hf_import import save_as_hf

    data = synthetic_world(
        tmp_path / "synthetic", "synthetic.annotated_rows=64", "synthetic.unlabelled_rows=1", "synthetic.eval_prompts=1"
    )
    tiny = replace(TrainConfig().model, num_query_groups=2, vocab_size=768)  # conf/model/tiny.yaml, the APM's vocab
    setup = _saved(layout, TrainConfig(model=tiny, output_dir=str(tmp_path / "lm")), False)
    save_as_hf(setup.chunks, tiny, tmp_path / "hf")
    for source in ("lm", "hf"):
        result = run_recipe(
            "train_attribute_model",
            [
                f"data.train_file={data}/annotated.jsonl",
                f"tokenizer.path={data}/tokenizer",
                "trainer.max_steps=2",
                f"output_dir={tmp_path / f'apm_{source}'}",
                f"apm.init_from={tmp_path / source}",
            ],
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "attribute head freshly initialised" in result.stderr
        assert json.loads((tmp_path / f"apm_{source}" / "eval.json").read_text())["last_step"] == 2


def test_a_rating_column_the_schema_lacks_stops_training(tmp_path: Path) -> None:
    """HelpSteer rows keep extra columns as passthrough: a rating the APM's schema lacks would go unlearned."""
    helpsteer = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    row = {"prompt": "q", "response": "r", **{name: 2 for name in helpsteer}, "humor": 3}
    (tmp_path / "hs.jsonl").write_text(json.dumps(row) + "\n")
    cfg = _apm_config(tmp_path, helpsteer)
    cfg = replace(cfg, data=replace(cfg.data, train_file=str(tmp_path / "hs.jsonl"), format=DataFormat.helpsteer2))
    with pytest.raises(ConfigError) as error:
        load_examples(cfg, cfg.attributes.schema(), WordTokenizer.build(["q r"]))
    assert error.value.key == "attributes.attributes" and "hs.jsonl:1 rates humor, which schema 'three' lacks" in str(
        error.value
    )
