"""Dataset readers and the conversation JSONL writer: every format, bad rows, rejects, round trips."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from steerlm.config.schema import AttributesConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.readers import (
    DEFAULT_SYSTEM_PROMPT,
    BadRowPolicy,
    DataFormat,
    ReadStats,
    RejectSink,
    oasst_label_names,
    read_records,
    split_helpsteer2_prompt,
    write_conversation_jsonl,
)
from steerlm.data.records import Conversation, Role, Turn, to_conversation_json
from steerlm.errors import DataError
from tests.schemas import STEERLM_OASST_ATTRIBUTES

HELPSTEER2 = AttributeSchema(
    "helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"), 0, 4, True
)
STEERLM_OASST = AttributeSchema(
    "steerlm_oasst",
    STEERLM_OASST_ATTRIBUTES,
    0,
    4,
    True,
)
STEERLM_PAPER = AttributeSchema(
    "steerlm_paper",
    ("quality", "toxicity", "violence", "helpfulness", "creativity", "humor", "not_appropriate"),
    0,
    9,
    True,
)
RATINGS = {"helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 1}


def write_lines(path: Path, rows: list[object]) -> Path:
    """One line per row: dicts as JSON, strings verbatim (for broken rows)."""
    text = "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return path


def helpsteer_row(prompt: str = "What is C#?", response: str = "A language.", **changes: object) -> dict:
    return {"prompt": prompt, "response": response, **RATINGS, **changes}


def read_all(path: Path, fmt: DataFormat, schema: AttributeSchema = HELPSTEER2, **kwargs: object) -> list:
    return list(read_records(path, fmt, schema, **kwargs))


def as_json(records: list[Conversation], schema: AttributeSchema = HELPSTEER2) -> list[dict]:
    return [to_conversation_json(record, schema) for record in records]


# --- conversation JSONL ----------------------------------------------------------------------------

CONVERSATION_ROW = {
    "system": "Be brief.",
    "mask": "User",
    "type": "VALUE_TO_TEXT",
    "id": 7,
    "conversations": [
        {"from": "User", "value": "Hi", "label": None},
        {"from": "Assistant", "value": "Hello!", "label": "helpfulness:4,correctness:3"},
        {"from": "User", "value": "Bye", "label": None},
        {"from": "Assistant", "value": "Goodbye.", "label": None},
    ],
}


def test_conversation_jsonl_reads_turns_labels_source_and_extra(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [CONVERSATION_ROW])
    [record] = read_all(path, DataFormat.conversation)
    labels = {"helpfulness": 4, "correctness": 3, "coherence": None, "complexity": None, "verbosity": None}
    assert record == Conversation(
        "Be brief.",
        (
            Turn(Role.user, "Hi"),
            Turn(Role.assistant, "Hello!", labels),
            Turn(Role.user, "Bye"),
            Turn(Role.assistant, "Goodbye."),
        ),
        f"{path}:1",
    )
    assert record.extra == {"id": 7}


def test_conversation_round_trip_is_equal_and_byte_stable(tmp_path: Path) -> None:
    other = {
        "conversations": [
            {"from": "User", "value": "数学 🧮", "label": None},
            {"from": "Assistant", "value": "٢+٢=٤", "label": "verbosity:0"},
        ]
    }
    source = write_lines(tmp_path / "in.jsonl", [CONVERSATION_ROW, other])
    first = read_all(source, DataFormat.conversation)
    assert write_conversation_jsonl(first, tmp_path / "a.jsonl", HELPSTEER2) == 2
    second = read_all(tmp_path / "a.jsonl", DataFormat.conversation)
    assert [(r.system, r.turns, r.extra) for r in second] == [(r.system, r.turns, r.extra) for r in first]
    write_conversation_jsonl(second, tmp_path / "b.jsonl", HELPSTEER2)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert json.loads((tmp_path / "a.jsonl").read_text("utf-8").splitlines()[0]) == {
        "system": "Be brief.",
        "conversations": CONVERSATION_ROW["conversations"],
        "mask": "User",
        "type": "VALUE_TO_TEXT",
        "id": 7,
    }


# --- HelpSteer / HelpSteer2 ------------------------------------------------------------------------


def test_helpsteer2_single_turn_becomes_nemo_aligner_conversation(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row()])
    records = read_all(path, DataFormat.helpsteer2)
    assert as_json(records) == [
        {
            "system": DEFAULT_SYSTEM_PROMPT,
            "conversations": [
                {"from": "User", "value": "What is C#?", "label": None},
                {
                    "from": "Assistant",
                    "value": "A language.",
                    "label": "helpfulness:3,correctness:4,coherence:4,complexity:2,verbosity:1",
                },
            ],
            "mask": "User",
            "type": "VALUE_TO_TEXT",
        }
    ]
    assert records[0].source == f"{path}:1"


def test_helpsteer2_multi_turn_prompt_is_one_user_turn_as_in_nemo_aligner(tmp_path: Path) -> None:
    """NeMo-Aligner's conversion keeps the packed history in the User turn, so its answers are never trained."""
    prompt = "Hi there\n<extra_id_1>Assistant\nHello!\nHow can I help?\n<extra_id_1>User\nTell me a joke"
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row(prompt, "Why did the chicken...")])
    [record] = read_all(path, DataFormat.helpsteer2)
    assert record.turns == (Turn(Role.user, prompt), Turn(Role.assistant, "Why did the chicken...", dict(RATINGS)))


def test_helpsteer2_turns_splits_the_multi_turn_prompt(tmp_path: Path) -> None:
    prompt = "Hi there\n<extra_id_1>Assistant\nHello!\nHow can I help?\n<extra_id_1>User\nTell me a joke"
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row(prompt, "Why did the chicken...")])
    [record] = read_all(path, DataFormat.helpsteer2_turns)
    assert record.turns == (
        Turn(Role.user, "Hi there"),
        Turn(Role.assistant, "Hello!\nHow can I help?"),
        Turn(Role.user, "Tell me a joke"),
        Turn(Role.assistant, "Why did the chicken...", dict(RATINGS)),
    )


def test_helpsteer_v1_keeps_the_prompt_as_one_turn(tmp_path: Path) -> None:
    prompt = "Hi there\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nTell me a joke"
    path = write_lines(tmp_path / "hs.jsonl", [helpsteer_row(prompt)])
    [record] = read_all(path, DataFormat.helpsteer)
    assert record.turns == (Turn(Role.user, prompt), Turn(Role.assistant, "A language.", dict(RATINGS)))


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ("Hi<extra_id_1>Assistant\nHello\n<extra_id_1>User\nQ", "marker not of the form"),
        ("Hi\n<extra_id_1>Assistant Hello\n<extra_id_1>User\nQ", "marker not of the form"),
        ("Hi\n<extra_id_1>Assistant\nHello", "ends with an Assistant turn"),
        ("Hi\n<extra_id_1>User\nAgain", "is User, expected Assistant"),
        ("Hi\n<extra_id_1>Assistant\n \n<extra_id_1>User\nQ", "empty assistant turn"),
    ],
)
def test_helpsteer2_malformed_multi_turn_prompt_names_the_problem(prompt: str, problem: str) -> None:
    with pytest.raises(DataError, match=problem) as caught:
        split_helpsteer2_prompt(prompt, "f.jsonl", 3)
    assert (caught.value.location, caught.value.field) == ("f.jsonl:3", "prompt")


def test_helpsteer_into_larger_schema_leaves_other_attributes_missing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row()])
    [record] = read_all(path, DataFormat.helpsteer2, STEERLM_OASST)
    labels = record.turns[-1].labels
    assert labels == {"quality": None, "toxicity": None, "humor": None, "creativity": None, **RATINGS}
    assert STEERLM_OASST.targets(labels) == [-100.0] * 4 + [3.0, 4.0, 4.0, 2.0, 1.0]
    assert (
        as_json([record], STEERLM_OASST)[0]["conversations"][1]["label"]
        == "helpfulness:3,correctness:4,coherence:4,complexity:2,verbosity:1"
    )


def test_helpsteer_into_a_schema_without_its_attributes_is_an_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row()])
    with pytest.raises(DataError, match="unknown attribute 'correctness' for schema 'steerlm_paper'") as caught:
        read_all(path, DataFormat.helpsteer2, STEERLM_PAPER)
    assert (caught.value.location, caught.value.field) == (f"{path}:1", "correctness")


def test_helpsteer_extra_columns_pass_through_and_schema_columns_are_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row(quality=2, id="x1")])
    [record] = read_all(path, DataFormat.helpsteer2, STEERLM_OASST)
    assert record.turns[-1].labels["quality"] == 2
    assert record.extra == {"id": "x1"}


def test_a_custom_schema_inside_a_known_one_reads_its_data(tmp_path: Path) -> None:
    """NeMo-Aligner's --only_helpfulness: HelpSteer2 rows (all five ratings, or only helpfulness) read with a
    helpfulness-only schema; the other ratings are not read, an attribute of no known schema still is an error."""
    only = AttributesConfig(name="helpfulness_only", attributes=["helpfulness"]).schema()
    assert only.left_out == tuple(sorted(set(STEERLM_OASST_ATTRIBUTES + STEERLM_PAPER.attributes) - {"helpfulness"}))
    both = {k: v for k, v in helpsteer_row().items() if k in ("prompt", "response", "helpfulness")}
    path = write_lines(tmp_path / "hs2.jsonl", [helpsteer_row(id=1), both])
    records = read_all(path, DataFormat.helpsteer2, only)
    assert [r.turns[-1].labels for r in records] == [{"helpfulness": 3}] * 2 and records[0].extra == {"id": 1}
    assert as_json(records, only)[0]["conversations"][1]["label"] == "helpfulness:3"
    assert HELPSTEER2.left_out == () and AttributesConfig().schema().left_out == ()
    conversation = {"conversations": [{"from": "User", "value": "Q"}, {"from": "Assistant", "value": "A", "label": ""}]}
    conversation["conversations"][1]["label"] = "quality:4,helpfulness:2"
    [record] = read_all(write_lines(tmp_path / "c.jsonl", [conversation]), DataFormat.conversation, only)
    assert record.turns[1].labels == {"helpfulness": 2}
    odd = AttributesConfig(name="odd", attributes=["helpfulness", "wit"]).schema()
    with pytest.raises(DataError, match="unknown attribute 'correctness'"):
        read_all(path, DataFormat.helpsteer2, odd)
    with pytest.raises(DataError, match="rates none of the HelpSteer attributes"):
        read_all(path, DataFormat.helpsteer2, AttributesConfig(name="q", attributes=["quality"]).schema())


def test_helpsteer_gzip_input_is_read_whatever_its_name(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"  # gzip without the .gz suffix: the first bytes decide
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write(json.dumps(helpsteer_row()) + "\n" + json.dumps(helpsteer_row(response="B.")) + "\n")
    records = read_all(path, DataFormat.helpsteer2)
    assert [r.turns[-1].text for r in records] == ["A language.", "B."]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]


def test_helpsteer_parquet_input(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    rows = [helpsteer_row(), helpsteer_row("Hi\n<extra_id_1>Assistant\nHey\n<extra_id_1>User\nQ?", "Ans 🙂")]
    path = tmp_path / "train-00000.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), path, row_group_size=1)
    stats = ReadStats()
    records = read_all(path, DataFormat.helpsteer2_turns, stats=stats)
    assert [len(r.turns) for r in records] == [2, 4]
    assert records[1].turns[-1] == Turn(Role.assistant, "Ans 🙂", dict(RATINGS))
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]
    assert (stats.rows_in, stats.rows_out) == (2, 2)


def test_parquet_without_pyarrow_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pyarrow"):
        read_all(path, DataFormat.helpsteer2)


# --- OASST trees -----------------------------------------------------------------------------------


def oasst_message(role: str, text: str, replies: list | None = None, labels: dict | None = None) -> dict:
    message = {"message_id": text, "role": role, "text": text, "lang": "en", "replies": replies or []}
    if labels is not None:
        message["labels"] = {name: {"value": value, "count": 3} for name, value in labels.items()}
    return message


A1_LABELS = {
    "quality": 0.625,
    "toxicity": 0.125,
    "humor": 0.375,
    "creativity": 1.0,
    "helpfulness": 0.875,
    "violence": 0.0,
    "spam": 0.5,
}
OASST_TREE = {
    "message_tree_id": "t1",
    "tree_state": "ready_for_export",
    "prompt": oasst_message(
        "prompter",
        "Q1",
        labels={"quality": 0.9},
        replies=[
            oasst_message(
                "assistant",
                "A1",
                labels=A1_LABELS,
                replies=[
                    oasst_message(
                        "prompter", "Q2", replies=[oasst_message("assistant", "A3", labels={"quality": None})]
                    ),
                    oasst_message("prompter", "Q3 (unanswered)"),
                ],
            ),
            {
                "role": "assistant",
                "text": "A2",
                "replies": [],  # the flat HF labels form
                "labels": {"name": ["quality", "humor"], "value": [0.5, 0.75], "count": [2, 2]},
            },
        ],
    ),
}


def test_oasst_tree_yields_every_root_to_leaf_path_with_0_4_labels(tmp_path: Path) -> None:
    unanswered = {"prompt": oasst_message("prompter", "Nobody answered")}
    path = write_lines(tmp_path / "trees.jsonl", [OASST_TREE, unanswered, {"message_tree_id": "t3", "prompt": None}])
    stats = ReadStats()
    records = read_all(path, DataFormat.oasst, STEERLM_OASST, stats=stats)
    assert [[t.text for t in r.turns] for r in records] == [
        ["Q1", "A1", "Q2", "A3"],
        ["Q1", "A1", "Q3 (unanswered)"],
        ["Q1", "A2"],
    ]
    assert {r.source for r in records} == {f"{path}:1"}
    assert [turn.get("label") for turn in as_json(records, STEERLM_OASST)[0]["conversations"]] == [
        None,
        "quality:2,toxicity:0,humor:2,creativity:4",
        None,
        "",
    ]  # A3 has a labels object but no value: an empty attribute line, as NeMo-Aligner's empty label string
    assert records[2].turns[1].labels["quality"] == 2 and records[2].turns[1].labels["humor"] == 3
    assert records[0].turns[1].labels["helpfulness"] is None  # HelpSteer's helpfulness is not OASST's
    assert all(r.system == DEFAULT_SYSTEM_PROMPT for r in records)
    assert (stats.rows_in, stats.rows_out, stats.rows_without_conversation) == (3, 3, 2)


def test_oasst_answer_with_no_readable_label_keeps_an_empty_attribute_line(tmp_path: Path) -> None:
    """NeMo-Aligner writes label "" (its encode_labels finds none of its attributes) and trains the answer after
    `<extra_id_2>\\n`; an APM has no target there (its regression conversion skips empty labels)."""
    from steerlm.data.apm import labelled_turns
    from steerlm.data.template import SteerLMTemplate

    tree = {"prompt": oasst_message("prompter", "Q", [oasst_message("assistant", "A", labels={"spam": 0.2})])}
    [record] = read_all(write_lines(tmp_path / "t.jsonl", [tree]), DataFormat.oasst, STEERLM_OASST)
    assert as_json([record], STEERLM_OASST)[0]["conversations"][1]["label"] == ""
    segments = SteerLMTemplate(STEERLM_OASST).segments(record)
    assert [(x.text, x.trainable) for x in segments[-2:]] == [
        ("<extra_id_1>Assistant\n<extra_id_2>\n", False),
        ("A\n<extra_id_1>", True),
    ]
    assert not labelled_turns(record, 1)


def test_oasst_labels_on_the_paper_0_9_scale(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "trees.jsonl", [OASST_TREE])
    records = read_all(path, DataFormat.oasst, STEERLM_PAPER)
    assert records[0].turns[1].labels == {
        "quality": 6,
        "toxicity": 1,
        "violence": 0,
        "helpfulness": 8,
        "creativity": 9,
        "humor": 3,
        "not_appropriate": None,
    }
    assert as_json(records, STEERLM_PAPER)[2]["conversations"][1]["label"] == "quality:4,humor:7"


def test_oasst_label_names_per_schema() -> None:
    assert oasst_label_names(STEERLM_OASST) == ("quality", "toxicity", "humor", "creativity")
    assert oasst_label_names(STEERLM_PAPER) == STEERLM_PAPER.attributes
    assert oasst_label_names(HELPSTEER2) == ()


@pytest.mark.parametrize(
    "tree, field, problem",
    [
        (
            {"prompt": oasst_message("prompter", "Q", [oasst_message("assistant", "A", labels={"quality": 1.5})])},
            "prompt.replies[0].labels.quality",
            "label out of range",
        ),
        (
            {"prompt": oasst_message("prompter", "Q", [oasst_message("system", "A")])},
            "prompt.replies[0].role",
            "is not 'prompter' or 'assistant'",
        ),
        (
            {"prompt": oasst_message("prompter", "Q", [oasst_message("prompter", "Q again")])},
            "prompt.replies[0].role",
            "expected Assistant",
        ),
        ({"prompt": oasst_message("assistant", "A")}, "prompt.role", "expected User"),
        (
            {"prompt": oasst_message("prompter", "Q", [oasst_message("assistant", "  ")])},
            "prompt.replies[0].text",
            "empty assistant response",
        ),
        (
            {"prompt": oasst_message("prompter", "Q", [oasst_message("assistant", "A", labels={"humor": "high"})])},
            "prompt.replies[0].labels.humor",
            "not a number",
        ),
        ({"message_tree_id": "t"}, "prompt", "missing field"),
    ],
)
def test_oasst_bad_trees_name_line_and_message(tmp_path: Path, tree: dict, field: str, problem: str) -> None:
    path = write_lines(tmp_path / "trees.jsonl", [OASST_TREE, tree])
    with pytest.raises(DataError, match=problem) as caught:
        read_all(path, DataFormat.oasst, STEERLM_OASST)
    assert (caught.value.location, caught.value.field) == (f"{path}:2", field)


# --- plain -----------------------------------------------------------------------------------------


# --- NeMo-Aligner's regression rows and row kinds ---------------------------------------------------------


def regression_text(*turns: str, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """process_to_regression_format.py's text: its SYSTEM_PROMPT/USER/ASSISTANT templates and LABEL_PREFIX."""
    text = f"<extra_id_0>System\n{system}\n"
    for index, turn in enumerate(turns):
        text += f"<extra_id_1>{'User' if index % 2 == 0 else 'Assistant'}\n{turn}\n"
    return text + "<extra_id_2>"


def test_regression_rows_become_the_conversation_the_apm_reads(tmp_path: Path) -> None:
    from steerlm.data.template import SteerLMTemplate

    text = regression_text("Hi", "Hello!", "Bye\nnow", "See you.")
    nine = [-100, -100, -100, -100, 3, 4, 4, 2, 1]
    rows = [{"text": text, "label": nine, "id": 5}, {"text": regression_text("Q", "A"), "label": [1, 2, 3, -100, 0]}]
    records = read_all(write_lines(tmp_path / "reg.jsonl", rows), DataFormat.regression)
    assert [t.text for t in records[0].turns] == ["Hi", "Hello!", "Bye\nnow", "See you."]
    assert records[0].turns[1].labels is None and records[0].turns[3].labels == RATINGS
    assert records[0].extra == {"id": 5} and records[0].system == DEFAULT_SYSTEM_PROMPT
    assert SteerLMTemplate(HELPSTEER2).attribute_prompt(records[0].system, list(records[0].turns)) == text
    assert HELPSTEER2.targets(records[1].turns[-1].labels) == [1.0, 2.0, 3.0, -100.0, 0.0]  # the schema's order
    [nine_attributes] = read_all(write_lines(tmp_path / "r9.jsonl", rows[:1]), DataFormat.regression, STEERLM_OASST)
    assert STEERLM_OASST.targets(nine_attributes.turns[-1].labels) == [float(v) for v in nine]


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"text": regression_text("Q", "A"), "label": [1, 2]}, "label", "has 2 values"),
        ({"text": regression_text("Q", "A"), "label": "helpfulness:3"}, "label", "a list of numbers"),
        ({"text": regression_text("Q", "A")[:-12], "label": [1] * 5}, "text", "must start with"),
        ({"text": regression_text("Q"), "label": [1] * 5}, "text", "end with the rated Assistant"),
        ({"text": regression_text("Q", "A") + "<extra_id_2>", "label": [1] * 5}, "text", "must start with"),
    ],
)
def test_bad_regression_rows_name_line_and_field(tmp_path: Path, row: dict, field: str, problem: str) -> None:
    path = write_lines(tmp_path / "reg.jsonl", [row])
    with pytest.raises(DataError, match=problem) as caught:
        read_all(path, DataFormat.regression)
    assert (caught.value.location, caught.value.field) == (f"{path}:1", field)


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"type": "TEXT_TO_VALUE"}, "type", "TEXT_TO_VALUE rows train the attribute line written after the response"),
        ({"type": "CHAT"}, "type", "'CHAT' is not a NeMo-Aligner row type"),
        ({"mask": "Assistant"}, "mask", "mask='Assistant' would mask that role and train the User turns"),
    ],
)
def test_rows_nemo_trains_otherwise_are_refused(tmp_path: Path, change: dict, field: str, reason: str) -> None:
    path = write_lines(tmp_path / "c.jsonl", [CONVERSATION_ROW, {**CONVERSATION_ROW, **change}])
    with pytest.raises(DataError, match=reason) as caught:
        read_all(path, DataFormat.conversation)
    assert (caught.value.location, caught.value.field) == (f"{path}:2", field)
    untyped = {k: v for k, v in CONVERSATION_ROW.items() if k not in ("type", "mask")}
    assert len(read_all(write_lines(tmp_path / "ok.jsonl", [untyped]), DataFormat.conversation)) == 1


def test_plain_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "P", "response": "R", "attributes": {"helpfulness": 4, "verbosity": None}},
        {"prompt": "P2", "response": "R2", "attributes": {}, "system": "", "split": "train"},
    ]
    path = write_lines(tmp_path / "plain.jsonl", rows)
    records = read_all(path, DataFormat.plain)
    assert as_json(records) == [
        {
            "system": DEFAULT_SYSTEM_PROMPT,
            "conversations": [
                {"from": "User", "value": "P", "label": None},
                {"from": "Assistant", "value": "R", "label": "helpfulness:4"},
            ],
            "mask": "User",
            "type": "VALUE_TO_TEXT",
        },
        {
            "system": "",
            "conversations": [
                {"from": "User", "value": "P2", "label": None},
                {"from": "Assistant", "value": "R2", "label": ""},
            ],
            "mask": "User",
            "type": "VALUE_TO_TEXT",
            "split": "train",
        },
    ]


# --- text edge cases -------------------------------------------------------------------------------


def test_unicode_is_preserved_through_read_and_write(tmp_path: Path) -> None:
    prompt = "日本語で答えて 🙂 and مرحبا بالعالم\u2028(line separator) \u200f"
    response = "はい 👍🏽 — שלום עולם\u2029 e\u0301"
    path = write_lines(tmp_path / "u.jsonl", [{"prompt": prompt, "response": response, "attributes": {}}])
    [record] = read_all(path, DataFormat.plain)
    assert (record.turns[0].text, record.turns[1].text) == (prompt, response)
    write_conversation_jsonl([record], tmp_path / "out.jsonl", HELPSTEER2)
    written = (tmp_path / "out.jsonl").read_text("utf-8")
    assert "日本語" in written and "👍🏽" in written and "שלום" in written and "\\u" not in written
    [again] = read_all(tmp_path / "out.jsonl", DataFormat.conversation)
    assert again.turns == record.turns


def test_very_long_row_is_read(tmp_path: Path) -> None:
    response = "ж" * 600_000 + "x" * 500_000  # > 1.5 MB of UTF-8 on one line
    path = write_lines(tmp_path / "long.jsonl", [helpsteer_row(response=response), helpsteer_row()])
    records = read_all(path, DataFormat.helpsteer2)
    assert records[0].turns[-1].text == response and len(records) == 2


def test_empty_and_blank_files_give_no_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    assert read_all(tmp_path / "empty.jsonl", DataFormat.helpsteer2) == []
    stats = ReadStats()
    assert read_all(tmp_path / "blank.jsonl", DataFormat.conversation, stats=stats) == []
    assert (stats.rows_in, stats.blank_lines) == (0, 3)


def test_crlf_endings_bom_and_blank_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    body = (
        "\ufeff"
        + json.dumps(helpsteer_row())
        + "\r\n\r\n"
        + json.dumps(helpsteer_row(response="B"))
        + "\r\n"
        + '{"prompt": 1}\r\n'
    )
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(body.encode("utf-8"))
    with RejectSink(tmp_path / "rejects.jsonl") as sink:
        records = read_all(path, DataFormat.helpsteer2, on_bad_row=BadRowPolicy.reject, rejects=sink)
    assert [(r.source, r.turns[-1].text) for r in records] == [(f"{path}:1", "A language."), (f"{path}:3", "B")]
    [rejected] = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert (rejected["source"], rejected["row"]) == (f"{path}:4", '{"prompt": 1}')


def test_reading_is_streamed_rows_come_before_a_later_bad_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [helpsteer_row(), "{broken"])
    records = read_records(path, DataFormat.helpsteer2, HELPSTEER2)
    assert next(records).turns[-1].text == "A language."
    with pytest.raises(DataError, match=":2: not valid JSON"):
        next(records)


# --- bad rows --------------------------------------------------------------------------------------

BAD_ROWS = [
    ("bad json", DataFormat.helpsteer2, '{"prompt": "P", "response": ', None, "not valid JSON"),
    ("not an object", DataFormat.plain, '["P", "R"]', None, "expected a JSON object, got list"),
    (
        "duplicate key",
        DataFormat.helpsteer2,
        '{"prompt": "P", "response": "R", "helpfulness": 1, "helpfulness": 4, "correctness": 4, "coherence": 4, '
        '"complexity": 2, "verbosity": 1}',
        "helpfulness",
        "key appears twice",
    ),
    ("missing response", DataFormat.helpsteer2, {"prompt": "P", **RATINGS}, "response", "missing field"),
    (
        "missing rating",
        DataFormat.helpsteer,
        {"prompt": "P", "response": "R", "helpfulness": 2},
        "correctness",
        "missing rating",
    ),
    ("wrong type", DataFormat.helpsteer2, helpsteer_row(prompt=42), "prompt", "must be a string, got int"),
    ("rating out of range", DataFormat.helpsteer2, helpsteer_row(helpfulness=7), "helpfulness", "outside [0, 4]"),
    ("rating not an integer", DataFormat.helpsteer2, helpsteer_row(verbosity=1.5), "verbosity", "not an integer"),
    ("empty response", DataFormat.helpsteer2, helpsteer_row(response="  \n"), "response", "empty response"),
    (
        "unknown attribute",
        DataFormat.plain,
        {"prompt": "P", "response": "R", "attributes": {"humour": 2}},
        "attributes.humour",
        "unknown attribute 'humour'",
    ),
    (
        "attributes not an object",
        DataFormat.plain,
        {"prompt": "P", "response": "R", "attributes": [1]},
        "attributes",
        "must be an object",
    ),
    (
        "reserved column",
        DataFormat.plain,
        {"prompt": "P", "response": "R", "attributes": {}, "type": "x"},
        "type",
        "reserved",
    ),
    (
        "conversation label",
        DataFormat.conversation,
        {
            "conversations": [
                {"from": "User", "value": "Q", "label": None},
                {"from": "Assistant", "value": "A", "label": "helpfulness:9"},
            ]
        },
        "conversations[1].label",
        "outside [0, 4]",
    ),
    (
        "conversation empty response",
        DataFormat.conversation,
        {"conversations": [{"from": "User", "value": "Q"}, {"from": "Assistant", "value": ""}]},
        "conversations[1].value",
        "empty assistant response",
    ),
]


@pytest.mark.parametrize("fmt, row, field, problem", [case[1:] for case in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_raises_with_file_line_and_field(
    tmp_path: Path, fmt: DataFormat, row: object, field: str | None, problem: str
) -> None:
    good = {
        DataFormat.plain: {"prompt": "P", "response": "R", "attributes": {}},
        DataFormat.conversation: CONVERSATION_ROW,
    }.get(fmt, helpsteer_row())
    path = write_lines(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as caught:
        read_all(path, fmt)
    message = str(caught.value)
    assert message.startswith(f"{path}:2:") and problem in message
    assert caught.value.field == field and (field is None or repr(field) in message)


def test_invalid_utf8_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(helpsteer_row()).encode() + b"\n" + '{"prompt": "café"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        read_all(path, DataFormat.helpsteer2)


# --- reject policy ---------------------------------------------------------------------------------


def test_reject_policy_writes_rejects_and_counts(tmp_path: Path) -> None:
    bad_json = '{"prompt": "P"'
    rows = [helpsteer_row(), bad_json, helpsteer_row(helpfulness=9), "", helpsteer_row(response="B")]
    path = write_lines(tmp_path / "in.jsonl", rows)
    stats = ReadStats()
    with RejectSink(tmp_path / "rejects.jsonl") as sink:
        records = read_all(path, DataFormat.helpsteer2, on_bad_row=BadRowPolicy.reject, rejects=sink, stats=stats)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:5"]
    rejected = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert rejected == [
        {
            "source": f"{path}:2",
            "field": None,
            "row": bad_json,
            "reason": "not valid JSON (Expecting ',' delimiter at column 15). Fix: write one JSON object per line",
        },
        {
            "source": f"{path}:3",
            "field": "helpfulness",
            "row": json.dumps(rows[2]),
            "reason": "helpfulness=9 is outside [0, 4] of schema 'helpsteer2'. "
            "Fix: fix the label or the schema's range",
        },
    ]
    assert (stats.rows_in, stats.rows_out, stats.rejected, stats.blank_lines, sink.count) == (4, 2, 2, 1, 2)
    assert stats.reasons == Counter({"row": 1, "helpfulness": 1}) and stats.rows_ok == 2


def test_reject_policy_with_parquet_keeps_the_row_object(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    rows = [helpsteer_row(), helpsteer_row(response="")]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "in.parquet")
    with RejectSink(tmp_path / "rejects.jsonl") as sink:
        records = read_all(tmp_path / "in.parquet", DataFormat.helpsteer2, on_bad_row="reject", rejects=sink)
    [rejected] = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert len(records) == 1 and rejected["row"] == rows[1] and rejected["source"].endswith("in.parquet:2")


def test_reject_policy_needs_a_sink(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [helpsteer_row()])
    with pytest.raises(ValueError, match="needs a RejectSink"):
        read_records(path, DataFormat.helpsteer2, HELPSTEER2, on_bad_row=BadRowPolicy.reject)
    with pytest.raises(ValueError, match="not one of conversation, helpsteer2"):
        read_records(path, "helpsteer3", HELPSTEER2)  # type: ignore[arg-type]
    assert len(read_all(path, "helpsteer2")) == 1  # type: ignore[arg-type]


def test_reject_sink_writes_values_json_cannot_hold(tmp_path: Path) -> None:
    with RejectSink(tmp_path / "rejects.jsonl") as sink:
        sink.write(DataError("in.parquet", 3, "response", "empty response"), {"response": b"\xff", "n": float("nan")})
    [rejected] = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert rejected["source"] == "in.parquet:3" and rejected["row"]["response"] == "b'\\xff'"


def test_reject_sink_is_atomic(tmp_path: Path) -> None:
    with RejectSink(tmp_path / "none.jsonl"):
        pass
    assert (tmp_path / "none.jsonl").read_bytes() == b""
    with pytest.raises(KeyError):
        with RejectSink(tmp_path / "aborted.jsonl") as sink:
            sink.write(DataError("f", 1, "x", "bad"), "row")
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == [tmp_path / "none.jsonl"]


# --- writer ----------------------------------------------------------------------------------------


def test_writer_is_atomic_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")
    record = Conversation("", (Turn(Role.user, "Q"), Turn(Role.assistant, "A", {"helpfulness": 1})), "s:1")

    def failing():
        yield record
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_conversation_jsonl(failing(), target, HELPSTEER2)
    assert target.read_text("utf-8") == "old\n" and list(tmp_path.iterdir()) == [target]
    assert write_conversation_jsonl([record, record], target, HELPSTEER2) == 2
    assert len(target.read_text("utf-8").splitlines()) == 2


def test_writer_refuses_labels_the_schema_would_drop(tmp_path: Path) -> None:
    record = Conversation("", (Turn(Role.user, "Q"), Turn(Role.assistant, "A", {"humor": 2})), "in.jsonl:4")
    with pytest.raises(DataError, match="unknown attribute 'humor'") as caught:
        write_conversation_jsonl([record], tmp_path / "out.jsonl", HELPSTEER2)
    assert caught.value.source == "in.jsonl:4" and not (tmp_path / "out.jsonl").exists()


def test_writer_refuses_extra_fields_that_shadow_conversation_keys(tmp_path: Path) -> None:
    record = Conversation("", (Turn(Role.user, "Q"), Turn(Role.assistant, "A")), "in.jsonl:2", {"mask": "x"})
    with pytest.raises(DataError, match="shadows") as caught:
        write_conversation_jsonl([record], tmp_path / "out.jsonl", HELPSTEER2)
    assert caught.value.field == "mask" and not (tmp_path / "out.jsonl").exists()
