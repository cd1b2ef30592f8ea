"""Attribute schemas and the SteerLM template: golden strings written out from the NeMo-Aligner format."""

from __future__ import annotations

import pytest

from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.errors import DataError
from tests.schemas import STEERLM_OASST_ATTRIBUTES

HELPSTEER2 = AttributeSchema("helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
OASST = AttributeSchema(
    "steerlm_oasst",
    STEERLM_OASST_ATTRIBUTES,
)
PAPER = AttributeSchema(
    "steerlm_paper", ("quality", "toxicity", "violence", "helpfulness", "creativity", "humor", "not_appropriate"), 0, 9
)

HS2_LABELS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}
HS2_LINE = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"


def _single(system: str, labels) -> Conversation:
    return Conversation(system, (Turn(Role.user, "What is 2+2?"), Turn(Role.assistant, "It is 4.", labels)))


def test_single_turn_with_system_prompt() -> None:
    text = SteerLMTemplate(HELPSTEER2).render(_single("You are kind.", HS2_LABELS))
    assert text == (
        "<extra_id_0>System\nYou are kind.\n"
        "<extra_id_1>User\nWhat is 2+2?\n"
        "<extra_id_1>Assistant\n<extra_id_2>" + HS2_LINE + "\nIt is 4.\n<extra_id_1>"
    )


def test_multi_turn_without_system_prompt() -> None:
    conversation = Conversation(
        "",
        (
            Turn(Role.user, "Hi"),
            Turn(Role.assistant, "Hello!", HS2_LABELS),
            Turn(Role.user, "Bye"),
            Turn(Role.assistant, "See you.", {**HS2_LABELS, "verbosity": 0}),
        ),
    )
    assert SteerLMTemplate(HELPSTEER2).render(conversation) == (
        "<extra_id_0>System\n\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\n<extra_id_2>" + HS2_LINE + "\nHello!\n"
        "<extra_id_1>User\nBye\n"
        "<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:0\n"
        "See you.\n<extra_id_1>"
    )


def test_missing_labels_are_left_out_and_unlabelled_turns_have_no_attribute_line() -> None:
    partial = HELPSTEER2.check({"helpfulness": 3, "verbosity": 1})
    assert partial["correctness"] is None
    text = SteerLMTemplate(HELPSTEER2).render(_single("", partial))
    assert "<extra_id_2>helpfulness:3,verbosity:1\nIt is 4." in text
    assert "<extra_id_2>" not in SteerLMTemplate(HELPSTEER2).render(_single("", None))


@pytest.mark.parametrize(
    "schema,labels,line",
    [
        (
            OASST,
            {
                "quality": 4,
                "toxicity": 0,
                "humor": 0,
                "creativity": 0,
                "helpfulness": 4,
                "correctness": 4,
                "coherence": 4,
                "complexity": 2,
                "verbosity": 2,
            },
            "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2",
        ),
        (
            PAPER,
            {
                "humor": 3,
                "quality": 9,
                "toxicity": 0,
                "violence": 0,
                "helpfulness": 8,
                "creativity": 5,
                "not_appropriate": 0,
            },
            "quality:9,toxicity:0,violence:0,helpfulness:8,creativity:5,humor:3,not_appropriate:0",
        ),
        (
            HELPSTEER2,
            {"verbosity": 1, "helpfulness": 2, "coherence": 4, "complexity": 0, "correctness": 3},
            "helpfulness:2,correctness:3,coherence:4,complexity:0,verbosity:1",
        ),
    ],
    ids=["steerlm_oasst", "steerlm_paper", "helpsteer2"],
)
def test_each_schema_writes_its_fixed_order(schema: AttributeSchema, labels: dict, line: str) -> None:
    text = SteerLMTemplate(schema).render(_single("", schema.check(labels)))
    assert f"<extra_id_1>Assistant\n<extra_id_2>{line}\nIt is 4.\n<extra_id_1>" in text
    assert schema.parse(line) == schema.check(labels)


def test_only_responses_and_their_closing_token_are_trained() -> None:
    conversation = Conversation(
        "S",
        (
            Turn(Role.user, "Q1"),
            Turn(Role.assistant, "A1", HS2_LABELS),
            Turn(Role.user, "Q2"),
            Turn(Role.assistant, "A2", HS2_LABELS),
        ),
    )
    trained = [s.text for s in SteerLMTemplate(HELPSTEER2).segments(conversation) if s.trainable]
    assert trained == ["A1\n<extra_id_1>", "A2\n<extra_id_1>"]
    everything = SteerLMTemplate(HELPSTEER2, TemplateConfig(answer_only_loss=False)).segments(conversation)
    assert all(segment.trainable for segment in everything)


def test_unlabelled_responses_can_be_context_only() -> None:
    conversation = Conversation(
        "",
        (
            Turn(Role.user, "Q1"),
            Turn(Role.assistant, "A1"),
            Turn(Role.user, "Q2"),
            Turn(Role.assistant, "A2", HS2_LABELS),
        ),
    )
    trained = [s.text for s in SteerLMTemplate(HELPSTEER2).segments(conversation) if s.trainable]
    assert trained == ["A1\n<extra_id_1>", "A2\n<extra_id_1>"]
    config = TemplateConfig(train_unlabelled_responses=False)
    trained = [s.text for s in SteerLMTemplate(HELPSTEER2, config).segments(conversation) if s.trainable]
    assert trained == ["A2\n<extra_id_1>"]


def test_plain_sft_baseline_has_no_attribute_line() -> None:
    template = SteerLMTemplate(HELPSTEER2, TemplateConfig(condition_on_attributes=False))
    assert template.render(_single("", HS2_LABELS)) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\nIt is 4.\n<extra_id_1>"
    )


def test_inference_prompt_ends_with_the_requested_attributes() -> None:
    prompt = SteerLMTemplate(HELPSTEER2).inference_prompt(
        "S",
        [Turn(Role.user, "Q1"), Turn(Role.assistant, "A1", HS2_LABELS), Turn(Role.user, "Q2")],
        HELPSTEER2.check({**HS2_LABELS, "verbosity": 0}),
    )
    assert prompt == (
        "<extra_id_0>System\nS\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n<extra_id_2>"
        + HS2_LINE
        + "\nA1\n<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n"
        "<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:0\n"
    )


def test_custom_template_literals() -> None:
    config = TemplateConfig(
        system_prefix="[SYS]",
        user_prefix="[U]",
        assistant_prefix="[A]",
        label_prefix="[L]",
        turn_suffix="|",
        end_of_turn="[END]",
    )
    text = SteerLMTemplate(HELPSTEER2, config).render(_single("s", {"helpfulness": 1}))
    assert text == "[SYS]s|[U]What is 2+2?|[A][L]helpfulness:1|It is 4.|[END]"


def test_schema_regression_targets_and_clip_round() -> None:
    labels = HELPSTEER2.check({"helpfulness": 3, "verbosity": 1})
    assert HELPSTEER2.targets(labels) == [3.0, MISSING, MISSING, MISSING, 1.0]
    assert HELPSTEER2.check({"helpfulness": MISSING})["helpfulness"] is None
    scores = {"helpfulness": 4.6, "correctness": -0.7, "coherence": 2.5, "complexity": 1.49, "verbosity": 3.51}
    assert HELPSTEER2.clip_round(scores) == {
        "helpfulness": 4,
        "correctness": 0,
        "coherence": 2,
        "complexity": 1,
        "verbosity": 4,
    }


@pytest.mark.parametrize(
    "labels,phrase",
    [
        ({"helpfulness": 5}, "outside [0, 4]"),
        ({"humour": 1}, "unknown attribute 'humour'"),
        ({"helpfulness": 2.5}, "not an integer"),
        ({"helpfulness": "4"}, "not a number"),
    ],
)
def test_bad_labels_name_the_problem(labels: dict, phrase: str) -> None:
    with pytest.raises(DataError) as error:
        HELPSTEER2.check(labels, "train.jsonl", 7)
    assert "train.jsonl:7" in str(error.value) and phrase in str(error.value)


@pytest.mark.parametrize(
    "text,phrase",
    [("helpfulness=4", "not name:value"), ("helpfulness:4,helpfulness:3", "twice"), ("verbosity:lots", "not a number")],
)
def test_bad_attribute_strings_name_the_problem(text: str, phrase: str) -> None:
    with pytest.raises(DataError, match=phrase):
        HELPSTEER2.parse(text, "data.jsonl", 3)


def test_attribute_prompt_hides_labels_and_ends_with_the_label_prefix() -> None:
    turns = [
        Turn(Role.user, "Q1"),
        Turn(Role.assistant, "A1", HS2_LABELS),
        Turn(Role.user, "Q2"),
        Turn(Role.assistant, "A2", HS2_LABELS),
    ]
    assert SteerLMTemplate(HELPSTEER2).attribute_prompt("S", turns) == (
        "<extra_id_0>System\nS\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n"
        "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\nA2\n<extra_id_2>"
    )
