"""The internal record every reader produces, and NeMo-Aligner's conversation JSONL form of it.

Conversation JSONL (one object per line), as NeMo-Aligner writes it:

    {"system": "...", "mask": "User", "type": "VALUE_TO_TEXT",
     "conversations": [{"from": "User", "value": "...", "label": null},
                       {"from": "Assistant", "value": "...", "label": "helpfulness:4,..."}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.errors import DataError


class Role(str, Enum):
    user = "User"
    assistant = "Assistant"


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    labels: Labels | None = None  # assistant turns only; None: no attribute line


@dataclass(frozen=True)
class Conversation:
    system: str
    turns: tuple[Turn, ...]
    source: str = ""  # "file:line" it was read from
    extra: dict = field(default_factory=dict, compare=False)  # passthrough fields (e.g. raw scores)


def check_turn_text(role: Role, text: object, source: str, line: int | None, field: str) -> str:
    """A turn's text must be a string; an assistant response (a training target) must not be blank."""
    if not isinstance(text, str):
        raise DataError(source, line, field, "missing or not a string")
    if role == Role.assistant and not text.strip():
        raise DataError(source, line, field, "empty assistant response")
    return text


def to_conversation_json(conversation: Conversation, schema: AttributeSchema) -> dict:
    return {
        "system": conversation.system,
        "conversations": [
            {
                "from": turn.role.value,
                "value": turn.text,
                "label": None if turn.labels is None else schema.format(turn.labels),
            }
            for turn in conversation.turns
        ],
        "mask": Role.user.value,
        "type": "VALUE_TO_TEXT",
        **conversation.extra,
    }


def check_row_kind(obj: dict, source: str, line: int | None) -> None:
    """NeMo-Aligner's `type` and `mask` must describe attribute-conditioned SFT: answers written given their
    attribute line (VALUE_TO_TEXT, or no type) with the User turns masked. Anything else trains something
    else in NeMo, so it is refused rather than trained as an ordinary SFT row."""
    kind = obj.get("type")
    if kind == "TEXT_TO_VALUE":
        raise DataError(
            source,
            line,
            "type",
            "TEXT_TO_VALUE rows train the attribute line written after the response (NeMo's value model), "
            "not responses conditioned on their attributes",
            "train an attribute model on their labels (recipes/train_attribute_model.py), or set type to VALUE_TO_TEXT",
        )
    if kind is not None and kind != "VALUE_TO_TEXT":
        raise DataError(source, line, "type", f"{kind!r} is not a NeMo-Aligner row type", "use VALUE_TO_TEXT")
    if "mask" in obj and obj["mask"] != Role.user.value:
        raise DataError(
            source,
            line,
            "mask",
            f"mask={obj['mask']!r} would mask that role and train the User turns; steerlm trains the Assistant's "
            "answers (mask User)",
            "set mask to User",
        )


def from_conversation_json(obj: object, schema: AttributeSchema, source: str, line: int | None) -> Conversation:
    """Parse one conversation-JSONL object, naming file:line and the field on any problem."""
    if not isinstance(obj, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    check_row_kind(obj, source, line)
    turns_json = obj.get("conversations")
    if not isinstance(turns_json, list) or not turns_json:
        raise DataError(source, line, "conversations", "missing or empty", "give a list of {from, value, label} turns")
    system = obj.get("system", "")
    if not isinstance(system, str):
        raise DataError(source, line, "system", "must be a string")
    turns = []
    for index, turn in enumerate(turns_json):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataError(source, line, where, "must be an object with from/value/label")
        try:
            role = Role(turn.get("from"))
        except ValueError:
            raise DataError(
                source, line, f"{where}.from", f"{turn.get('from')!r} is not 'User' or 'Assistant'"
            ) from None
        text = check_turn_text(role, turn.get("value"), source, line, f"{where}.value")
        label = turn.get("label")
        if label is not None and not isinstance(label, str):
            raise DataError(source, line, f"{where}.label", "must be an attribute string or null")
        if label is not None and role == Role.user:
            raise DataError(source, line, f"{where}.label", "user turns carry no label", "set it to null")
        labels = None if label is None else schema.parse(label, source, line, f"{where}.label")
        turns.append(Turn(role, text, labels))
    if turns[0].role != Role.user:
        raise DataError(source, line, "conversations[0].from", "a conversation starts with a User turn")
    for index in range(1, len(turns)):
        if turns[index].role == turns[index - 1].role:
            raise DataError(source, line, f"conversations[{index}].from", "turns must alternate User/Assistant")
    known = {"system", "conversations", "mask", "type"}
    return Conversation(system, tuple(turns), f"{source}:{line}", {k: v for k, v in obj.items() if k not in known})
