"""OpenAssistant message trees (oasst1/oasst2 `*.trees.jsonl[.gz]`) → one Conversation per leaf.

Follows NeMo-Aligner's examples/nlp/data/steerlm/preprocess_openassistant_data.py:
- every root-to-leaf path of the tree is a conversation, in depth-first order of `replies`; paths of a
  single turn (a prompt nobody answered) are not conversations; a path may end on a User turn;
- "prompter" → User, "assistant" → Assistant; labels on prompter messages are not read;
- an assistant label value v in [0, 1] becomes round(v × (max − min) + min) on the schema's scale with
  Python's round (half to even): round(v × 4) for the 0-4 schemas, exactly NeMo-Aligner's
  round(value * (likert_scale - 1)); round(v × 9) for the paper's 0-9 schema;
- which OASST labels are read: see `oasst_label_names`; the schema's other attributes stay missing; an
  answer whose `labels` hold none of them keeps an empty attribute line, as in NeMo-Aligner's output.
No message is filtered (deleted, low quality or any language), as NeMo-Aligner uses the full export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.data.readers.helpsteer import HELPSTEER_ATTRIBUTES
from steerlm.data.records import Conversation, Role, Turn, check_turn_text
from steerlm.errors import DataError

# Label names in the OASST export's message `labels`.
OASST_LABELS = (
    "spam",
    "fails_task",
    "lang_mismatch",
    "pii",
    "not_appropriate",
    "hate_speech",
    "sexual_content",
    "quality",
    "toxicity",
    "humor",
    "helpfulness",
    "creativity",
    "violence",
)
_ROLES = {"prompter": Role.user, "assistant": Role.assistant}


def oasst_label_names(schema: AttributeSchema) -> tuple[str, ...]:
    """The schema attributes filled from OASST labels of the same name.

    A schema that also rates HelpSteer's five attributes means HelpSteer's helpfulness by
    'helpfulness', so OASST's own helpfulness label is not read: for NeMo-Aligner's nine-attribute
    schema this gives its OPEN_ASSISTANT_ATTRIBUTES (quality, toxicity, humor, creativity). The
    SteerLM paper's schema reads all seven of its attributes from OASST.
    """
    helpsteer_owns_helpfulness = set(HELPSTEER_ATTRIBUTES) <= set(schema.attributes)
    return tuple(
        name
        for name in schema.attributes
        if name in OASST_LABELS and not (name == "helpfulness" and helpsteer_owns_helpfulness)
    )


def conversations_from_oasst_tree(
    tree: Mapping[str, object], schema: AttributeSchema, source: str, line: int
) -> list[Conversation]:
    """All conversations of one tree line; the whole tree is checked before any is returned."""
    if "prompt" in tree:
        root, where = tree["prompt"], "prompt"
        if root is None:  # the export schema allows a tree without its prompt: nothing to train on
            return []
    elif "text" in tree and "role" in tree:  # a bare message, as NeMo-Aligner also accepts
        root, where = tree, "message"
    else:
        raise DataError(source, line, "prompt", "missing field", "give each tree line its root 'prompt' message")
    names = oasst_label_names(schema)
    paths: list[tuple[Turn, ...]] = []
    stack: list[tuple[object, str, tuple[Turn, ...]]] = [(root, where, ())]
    while stack:
        message, where, before = stack.pop()
        turn, replies = _message_turn(message, where, schema, names, source, line)
        expected = Role.user if len(before) % 2 == 0 else Role.assistant
        if turn.role != expected:
            raise DataError(
                source,
                line,
                f"{where}.role",
                f"is {turn.role.value}, expected {expected.value} "
                "(a tree starts with a prompter message and roles alternate)",
            )
        turns = (*before, turn)
        if not replies:
            paths.append(turns)
        for index in reversed(range(len(replies))):
            stack.append((replies[index], f"{where}.replies[{index}]", turns))
    return [Conversation(DEFAULT_SYSTEM_PROMPT, turns, f"{source}:{line}") for turns in paths if len(turns) > 1]


def _message_turn(
    message: object, where: str, schema: AttributeSchema, names: tuple[str, ...], source: str, line: int
) -> tuple[Turn, list]:
    if not isinstance(message, dict):
        raise DataError(source, line, where, f"a message must be an object, got {type(message).__name__}")
    role_name = message.get("role")
    role = _ROLES.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        raise DataError(source, line, f"{where}.role", f"{role_name!r} is not 'prompter' or 'assistant'")
    text = check_turn_text(role, message.get("text"), source, line, f"{where}.text")
    replies = message.get("replies")
    replies = [] if replies is None else replies
    if not isinstance(replies, list):
        raise DataError(source, line, f"{where}.replies", f"must be a list, got {type(replies).__name__}")
    labels = (
        _labels(message.get("labels"), f"{where}.labels", schema, names, source, line)
        if role == Role.assistant
        else None
    )
    return Turn(role, text, labels), replies


def _labels(
    raw: object, where: str, schema: AttributeSchema, names: tuple[str, ...], source: str, line: int
) -> Labels | None:
    """Schema labels from an OASST `labels` object; None (no attribute line) without one.

    Accepts the trees export's {name: {"value": v, "count": n}} and the flat HF form
    {"name": [...], "value": [...], "count": [...]}; a null value means not rated. A `labels` object with
    none of `names` gives labels that are all missing — an empty attribute line `<extra_id_2>\\n`, as
    NeMo-Aligner's encode_labels writes the empty label string "" and trains the answer after it.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DataError(source, line, where, f"must be an object, got {type(raw).__name__}")
    if isinstance(raw.get("name"), list):
        label_names, values = raw["name"], raw.get("value")
        if not isinstance(values, list) or len(values) != len(label_names):
            raise DataError(source, line, f"{where}.value", "must be a list as long as 'name'")
        raw = {name: {"value": value} for name, value in zip(label_names, values)}
    scaled: dict[str, object] = {}
    for name in names:
        if name not in raw:
            continue
        entry = raw[name]
        value = entry.get("value") if isinstance(entry, dict) else entry
        if value is None:
            continue
        field = f"{where}.{name}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise DataError(source, line, field, f"{value!r} is not a number")
        if not 0.0 <= value <= 1.0:
            raise DataError(
                source,
                line,
                field,
                f"label out of range: {value!r} is outside [0, 1]",
                "OASST label values are averages in [0, 1]",
            )
        span = value * (schema.max_value - schema.min_value) + schema.min_value
        scaled[name] = round(span) if schema.integer else span
    return schema.check(scaled, source, line, where)


def unschema_ratings(conversation: Conversation, schema: AttributeSchema) -> list[str]:
    """Passthrough columns of a HelpSteer-style row that rate an attribute (an OASST label name) `schema` lacks.

    The reader keeps them (nothing is dropped), but a stage that reads labels through `schema` would ignore
    them silently, so the stages refuse such rows, each naming its own key and fix.
    """
    return sorted(name for name in conversation.extra if name in OASST_LABELS and name not in schema.attributes)
