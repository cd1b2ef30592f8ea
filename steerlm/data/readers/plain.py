"""`plain` rows: {"prompt", "response", "attributes": {name: value}, optional "system"} → one Conversation.

The simplest way to bring your own labelled data: values are on the schema's own scale (checked, never
rescaled), a null value means "not rated", and unknown attribute names are errors.
"""

from __future__ import annotations

from collections.abc import Mapping

from steerlm.data.attributes import AttributeSchema
from steerlm.data.readers.fields import (
    DEFAULT_SYSTEM_PROMPT,
    check_labels,
    passthrough,
    require_response,
    require_string,
)
from steerlm.data.records import Conversation, Role, Turn
from steerlm.errors import DataError

_KNOWN = frozenset({"prompt", "response", "attributes", "system"})


def conversations_from_plain(
    row: Mapping[str, object], schema: AttributeSchema, source: str, line: int
) -> list[Conversation]:
    """A User prompt and its labelled Assistant response; other columns pass through to `extra`.

    A row without "system" gets NeMo-Aligner's default system prompt, like the dataset formats.
    """
    prompt = require_string(row, "prompt", source, line)
    response = require_response(row, "response", source, line)
    system = require_string(row, "system", source, line) if "system" in row else DEFAULT_SYSTEM_PROMPT
    attributes = row.get("attributes")
    if not isinstance(attributes, dict):
        problem = "missing field" if attributes is None else f"must be an object, got {type(attributes).__name__}"
        raise DataError(source, line, "attributes", problem, 'give {"name": value, ...} ({} if unrated)')
    labels = check_labels(schema, attributes, source, line, "attributes.")
    return [
        Conversation(
            system,
            (Turn(Role.user, prompt), Turn(Role.assistant, response, labels)),
            f"{source}:{line}",
            passthrough(row, _KNOWN, source, line),
        )
    ]
