"""Checks shared by the row readers: required strings, attribute values, passthrough columns.

Each check raises DataError naming the field, so every format reports problems the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.errors import DataError

# NeMo-Aligner's SYSTEM_PROMPT (examples/nlp/data/steerlm/common.py): its HelpSteer, HelpSteer2 and
# OASST preprocessing writes it into every conversation, so converted data matches theirs.
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Top-level keys of conversation JSONL; a passthrough column may not shadow them.
RESERVED_KEYS = frozenset({"system", "conversations", "mask", "type"})


def require_string(row: Mapping[str, object], key: str, source: str, line: int) -> str:
    """row[key], which must be present and a string (it may be empty)."""
    if key not in row or row[key] is None:
        raise DataError(source, line, key, "missing field", f"give every row a {key!r} string")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(source, line, key, f"must be a string, got {type(value).__name__}")
    return value


def require_response(row: Mapping[str, object], key: str, source: str, line: int) -> str:
    """row[key] as an assistant response: a string with more than whitespace (trained on, so never empty)."""
    text = require_string(row, key, source, line)
    if not text.strip():
        raise DataError(source, line, key, "empty response", "drop the row or give it a response")
    return text


def check_labels(
    schema: AttributeSchema, values: Mapping[str, object], source: str, line: int, field_prefix: str = ""
) -> Labels:
    """Labels in schema order (None where absent), each value checked under its own field name.

    Unknown names, non-numbers and out-of-range values raise DataError with field `prefix + name`; the
    schema's `left_out` attributes are not read.
    """
    labels: Labels = {name: None for name in schema.attributes}
    for name, value in values.items():
        if name in schema.left_out:
            continue
        checked = schema.check({name: value}, source, line, f"{field_prefix}{name}")
        labels[name] = checked[name]
    return labels


def passthrough(row: Mapping[str, object], known: frozenset[str], source: str, line: int) -> dict:
    """The row's other columns, kept (never dropped) and written back as top-level conversation keys."""
    extra = {key: value for key, value in row.items() if key not in known}
    for key in extra:
        if key in RESERVED_KEYS:
            raise DataError(
                source,
                line,
                key,
                "this column name is reserved in conversation JSONL",
                "rename the column, or read the file with format 'conversation'",
            )
    return extra
