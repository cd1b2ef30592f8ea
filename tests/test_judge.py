"""The Bayes judge and the label fit: posteriors equal an independent full-vocabulary forward, the judge reads
the levels a steerable model learned off responses it never saw, the fit recovers a known linear relation, and
every misconfiguration is refused naming its key. Annotation with a judge: tests/test_annotate.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlm.config import ConfigError
from steerlm.config.annotate import JudgeConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import Example, pad_batch
from steerlm.data.label_fit import fit_linear
from steerlm.data.lengths import LengthStats
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.records import Conversation, Role, Turn
from steerlm.errors import DataError
from steerlm.inference.judge import BayesJudge, JudgedTurn, check_judge
from steerlm.inference.prefix_scoring import common_prefix, grouped_log_probs
from steerlm.training import SEQUENCE_LOG_PROB, predict
from tests.schemas import STEERLM_OASST_ATTRIBUTES

SCHEMA = AttributeSchema("steerlm_oasst", STEERLM_OASST_ATTRIBUTES)


def _turns(path: Path, fmt: DataFormat, count: int) -> list[JudgedTurn]:
    """The last response of the first `count` conversations, the other attributes at their given labels (the
    default request where a conversation has none)."""
    turns = []
    for record in list(read_records(path, fmt, SCHEMA))[:count]:
        labels = record.turns[-1].labels or {}
        given = {name: value for name, value in {**SCHEMA.default_labels, **labels}.items() if value is not None}
        turns.append(JudgedTurn(record.system, record.turns[:-1], record.turns[-1].text, given, record.source))
    return turns


@pytest.fixture(scope="module")
def judge(steerable, layout) -> BayesJudge:
    return BayesJudge.from_checkpoint(
        str(steerable["sft"]), layout, ["humor", "toxicity"], SCHEMA, micro_batch_size=7, verify=False
    )


@pytest.mark.slow
def test_posteriors_equal_an_independent_forward(judge: BayesJudge, steerable) -> None:
    turns = _turns(steerable["data"] / "annotated.jsonl", DataFormat.helpsteer2, 6)
    posteriors = judge.posteriors(turns)
    assert posteriors.shape == (6, 2, 5)
    model, pad = judge.loaded.generator.model, judge.loaded.tokenizer.pad_id
    for turn, got in zip(turns, posteriors):
        examples = judge.examples(turn)  # attribute-major: humor 0..4, then toxicity 0..4
        log_p = []
        with torch.no_grad():
            for example in examples:  # one at a time: no padding, no buckets
                batch = pad_batch([example], pad)
                logits = model(batch["tokens"], batch["position_ids"], None).double()
                token = torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
                log_p.append(float((token * batch["loss_mask"]).sum()))
        expected = torch.softmax(torch.tensor(log_p, dtype=torch.float64).reshape(2, 5), 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)  # fp32 forward, padded vs alone
    np.testing.assert_allclose(judge.scores(turns), posteriors @ np.arange(5), atol=1e-12)


@pytest.mark.slow
def test_the_judge_reads_learned_levels_off_responses_it_never_saw(judge: BayesJudge, steerable) -> None:
    """The steerable model follows humor and toxicity (tests/test_steering.py); judged by Bayes' rule, the
    other attributes given at their true levels, the unlabelled responses' true levels come back (Pearson
    0.989 and 0.985 on these ten when written)."""
    records = list(read_records(steerable["data"] / "unlabelled.jsonl", DataFormat.conversation, SCHEMA))
    turns = [
        JudgedTurn(r.system, r.turns[:-1], r.turns[-1].text, {k: float(v) for k, v in r.extra["levels"].items()})
        for r in records
    ]
    judged = judge.scores(turns)
    for column, name in enumerate(judge.attributes):
        truth = [record.extra["levels"][name] for record in records]
        assert np.corrcoef(judged[:, column], truth)[0, 1] > 0.9, (name, judged[:, column], truth)


def test_a_long_input_keeps_its_end(judge: BayesJudge, steerable) -> None:
    turn = _turns(steerable["data"] / "annotated.jsonl", DataFormat.helpsteer2, 1)[0]
    long = JudgedTurn(turn.system * 200, turn.context, turn.response, turn.labels)
    full = judge.examples(turn)
    stats = LengthStats()
    cut = judge.examples(long, stats)
    assert stats.truncated == len(cut) == 10
    for short, kept in zip(full, cut):
        assert len(kept.ids) == judge.max_positions + 1
        assert kept.ids[-len(short.ids) + 5 :] == short.ids[5:] and kept.trainable[-20:] == short.trainable[-20:]


@pytest.mark.parametrize("micro_batch_size", [7, 64])
def test_each_turns_shared_prefix_computed_once_gives_the_whole_sequences_log_probs(
    judge: BayesJudge, steerable, layout, micro_batch_size: int
) -> None:
    """The default scoring (each turn's common prefix through the lean decoder once, its continuations on the
    cached keys and values) against every variant run whole through megatron's forward: the same log-probabilities
    to fp32 rounding, for turns of different lengths bucketed together (micro-batch 7: one turn per bucket; 64: six)
    and for a turn cut to the model's positions."""
    turns = _turns(steerable["data"] / "annotated.jsonl", DataFormat.helpsteer2, 8)
    turns.append(JudgedTurn(turns[0].system * 200, turns[0].context, turns[0].response, turns[0].labels))
    shared = BayesJudge(judge.loaded, judge.attributes, layout, micro_batch_size)
    whole = BayesJudge(judge.loaded, judge.attributes, layout, micro_batch_size, shared_prefix=False)
    assert (shared.scoring, whole.scoring) == ("shared_prefix", "whole")
    groups = [shared.examples(turn) for turn in turns]
    assert common_prefix(groups[0]) > len(groups[0][0].ids) // 3
    assert all(len(example.ids) == judge.max_positions + 1 for example in groups[-1])  # cut: its end kept
    model, pad = judge.loaded.generator.model, judge.loaded.tokenizer.pad_id
    first = groups[1][0]  # and a group with no common prefix at all
    groups.append([first, *(Example((pad, *e.ids[1:]), e.trainable) for e in groups[1][1:])])
    assert common_prefix(groups[-1]) == 0
    got = np.array(grouped_log_probs(shared.decoder, groups))
    expected = [predict([model], [pad_batch(group, pad)], layout, SEQUENCE_LOG_PROB)[0].tolist() for group in groups]
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-3)  # sums of ~100 fp32 log-probs
    np.testing.assert_allclose(shared.posteriors(turns), whole.posteriors(turns), atol=1e-5)


def test_a_judge_of_another_schema_or_attribute_is_refused(judge: BayesJudge) -> None:
    other = AttributeSchema("helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
    with pytest.raises(ConfigError, match="judge.checkpoint.*schema 'steerlm_oasst'.*'helpsteer2'"):
        check_judge(judge.loaded, ["correctness"], other, "ckpt", "judge.checkpoint")
    with pytest.raises(ConfigError, match="judge.attributes.*'wit' is not an attribute"):
        check_judge(judge.loaded, ["wit"], SCHEMA, "ckpt", "judge.checkpoint")


def _rated(rows: list[dict[str, float | None]]) -> list[Conversation]:
    return [
        Conversation("", (Turn(Role.user, "q"), Turn(Role.assistant, "a", dict(labels))), f"rated.jsonl:{i + 1}")
        for i, labels in enumerate(rows)
    ]


def test_the_fit_recovers_a_linear_relation_and_skips_incomplete_ratings() -> None:
    rng = np.random.default_rng(0)
    rows: list[dict[str, float | None]] = []
    for _ in range(200):
        labels: dict[str, float | None] = {name: float(rng.integers(0, 5)) for name in SCHEMA.attributes}
        labels["quality"] = 0.5 + 0.25 * labels["helpfulness"] + 0.3 * labels["correctness"] - 0.2 * labels["toxicity"]
        rows.append(labels)
    incomplete = {**rows[0], "humor": None, "quality": 100.0}  # would spoil the fit were it used
    fit = fit_linear(_rated([*rows, incomplete]), SCHEMA, "quality")
    assert fit.rows == 200 and fit.pearson == pytest.approx(1.0)
    weights = dict(zip(fit.inputs, fit.weights))
    assert fit.intercept == pytest.approx(0.5, abs=1e-9)
    assert weights == pytest.approx(
        {name: {"helpfulness": 0.25, "correctness": 0.3, "toxicity": -0.2}.get(name, 0.0) for name in fit.inputs},
        abs=1e-9,
    )
    assert fit.predict({**rows[3], "quality": None}) == pytest.approx(rows[3]["quality"])
    assert math.isnan(fit.predict({**rows[3], "correctness": None}))
    excluded = fit_linear(_rated(rows), SCHEMA, "quality", exclude=["humor"])
    assert "humor" not in excluded.inputs and len(excluded.inputs) == 7


def test_the_fit_refuses_too_few_complete_ratings() -> None:
    with pytest.raises(DataError, match="rated.jsonl: 3 assistant turns rate quality.*needs more than 18"):
        fit_linear(_rated([dict.fromkeys(SCHEMA.attributes, 1.0)] * 3), SCHEMA, "quality")


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"attributes": ["correctness"]}, "judge.checkpoint", "need a judge"),
        ({"refit": ["quality"]}, "judge.checkpoint", "need a judge"),
        ({"checkpoint": "runs/sft"}, "judge.attributes", "is empty"),
        ({"checkpoint": "runs/sft", "attributes": ["humor"], "micro_batch_size": 0}, "judge.micro_batch_size", ""),
        (
            {"checkpoint": "runs/sft", "attributes": ["correctness"], "refit": ["correctness"]},
            "judge.refit",
            "both judged and re-predicted",
        ),
        ({"checkpoint": "runs/sft", "attributes": ["correctness"], "refit": ["quality"]}, "judge.refit_data", ""),
    ],
)
def test_judge_settings_are_checked(settings: dict, key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}.*{problem}"):
        JudgeConfig(**settings).validate()


def test_the_report_names_what_the_judge_labelled_and_the_fit() -> None:
    from dataclasses import asdict

    from steerlm.evaluation.report import _judge_line

    fit = fit_linear(
        _rated([{**dict.fromkeys(SCHEMA.attributes, float(i % 5)), "humor": float(i % 3)} for i in range(40)]),
        SCHEMA,
        "quality",
    )
    judge = {"attributes": ["correctness"], "checkpoint": {"step": 4800}, "fits": [asdict(fit)]}
    line = _judge_line(judge)
    assert "correctness: judged by Bayes' rule" in line and "step 4800" in line
    assert f"Re-predicted after it: {fit.describe()}." in line
    assert _judge_line(None) == ""


def test_the_judged_labels_held_out_figures_are_targets_beside_the_apms_and_named_in_the_report() -> None:
    from steerlm.evaluation.report import _labels_held_out_line, judge_targets

    measured = {
        "correctness": {"pearson": 0.71, "pearson_oracle": 0.8, "exact_match": 0.5, "rows": 1971, "judged": True},
        "humor": {"pearson": 0.94, "pearson_oracle": 0.95, "exact_match": 0.9, "rows": 1968, "judged": True},
        "quality": {"pearson": 0.41, "pearson_oracle": 0.5, "exact_match": 0.3, "rows": 1970, "judged": False},
    }
    targets = {"apm_pearson_surface": 0.95, "apm_pearson_knowledge": 0.7}
    results = judge_targets(measured, targets)
    assert [(r.name, r.model, r.figure, r.target, r.met) for r in results] == [
        ("judge Pearson correctness", "judge", 0.71, 0.7, True),
        ("judge Pearson humor", "judge", 0.94, 0.95, False),  # a surface attribute keeps the surface target
    ]  # a refit attribute is reported, not held to a target
    line = _labels_held_out_line(measured)
    assert "the judge given the APM's other labels" in line
    assert "correctness (judged) Pearson 0.710 over 1,971 rows (vs oracle 0.800, label exact 0.500)" in line
    assert "humor (judged) Pearson 0.940 over 1,968 rows" in line and "quality (refit) Pearson 0.410" in line
    assert judge_targets({}, targets) == [] and _labels_held_out_line({}) == ""


@pytest.mark.slow
def test_the_bootstraps_labels_are_the_apms_with_the_judged_attributes_replaced(judge: BayesJudge, steerable) -> None:
    from steerlm.inference.judge import Judging
    from steerlm.stages.bootstrap import _judged

    records = list(read_records(steerable["data"] / "unlabelled.jsonl", DataFormat.conversation, SCHEMA))
    apm = [{**{name: 1.6 + 0.1 * i for i, name in enumerate(SCHEMA.attributes)}, "reward": 9.0} for _ in records]
    labels = _judged(Judging(judge, ()), records, apm, SCHEMA)
    before = SCHEMA.clip_round(apm[0])
    turns = [JudgedTurn(r.system, r.turns[:-1], r.turns[-1].text, before) for r in records]
    judged = judge.scores(turns)
    for got, row in zip(labels, judged):
        assert got == {**before, "humor": round(row[0]), "toxicity": round(row[1])}


def test_unknown_or_missing_attributes_are_refused_naming_the_key() -> None:
    from steerlm.inference.judge import require_attributes

    require_attributes(["quality"], SCHEMA, "judge.refit")
    require_attributes([], SCHEMA, "judge.refit")
    with pytest.raises(ConfigError, match="bootstrap.judge.refit.*'wit' is not an attribute of schema 'steerlm_oasst'"):
        require_attributes(["quality", "wit"], SCHEMA, "bootstrap.judge.refit")
    with pytest.raises(ConfigError, match="judge.attributes.*is empty"):
        require_attributes([], SCHEMA, "judge.attributes", allow_empty=False)
