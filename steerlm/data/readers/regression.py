"""NeMo-Aligner's regression reward-model rows (`regression`) → one Conversation each.

NeMo-Aligner's examples/nlp/data/steerlm/process_to_regression_format.py writes one row per labelled
assistant turn:

    {"text": "<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n{answer}\\n"
             "<extra_id_2>",
     "label": [quality, toxicity, humor, creativity, helpfulness, correctness, coherence, complexity, verbosity]}

`text` is the conversation up to the rated answer without attribute lines, ending with the label prefix —
exactly what `SteerLMTemplate.attribute_prompt` renders — and `label` holds nine numbers in its
ALL_STEERLM_ATTRIBUTES order, -100 where an attribute is not rated. The text is split back into turns on
`\\n<extra_id_1>User\\n` / `\\n<extra_id_1>Assistant\\n` and the labels go on the last (rated) answer; a
row whose turns do not render back to its text byte for byte is refused, so the APM reads exactly NeMo's
text. A `label` list as long as the schema is read in the schema's order instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from steerlm.data.attributes import KNOWN_SCHEMAS, MISSING, AttributeSchema
from steerlm.data.readers.fields import passthrough, require_string
from steerlm.data.records import Conversation, Role, Turn, check_turn_text
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.errors import DataError

# NeMo-Aligner's ALL_STEERLM_ATTRIBUTES (OPEN_ASSISTANT_ATTRIBUTES + HELPSTEER_ATTRIBUTES): its label order.
NEMO_REGRESSION_ATTRIBUTES = KNOWN_SCHEMAS["steerlm_oasst"]
_TEMPLATE = TemplateConfig()
_TURN = re.compile(r"\n<extra_id_1>(User|Assistant)\n")
_KNOWN = frozenset({"text", "label"})


def conversations_from_regression(
    row: Mapping[str, object], schema: AttributeSchema, source: str, line: int
) -> list[Conversation]:
    """The conversation of `text`, its last answer labelled with `label` (see the module docstring)."""
    text = require_string(row, "text", source, line)
    values = row.get("label")
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in values
    ):
        raise DataError(source, line, "label", "must be a list of numbers (-100 where not rated)")
    if len(values) == len(schema.attributes):
        names = schema.attributes
    elif len(values) == len(NEMO_REGRESSION_ATTRIBUTES):
        names = NEMO_REGRESSION_ATTRIBUTES
    else:
        raise DataError(
            source,
            line,
            "label",
            f"has {len(values)} values: NeMo-Aligner writes {len(NEMO_REGRESSION_ATTRIBUTES)} "
            f"({', '.join(NEMO_REGRESSION_ATTRIBUTES)}), schema '{schema.name}' has {len(schema.attributes)}",
            "give one value per attribute in one of those orders, -100 where not rated",
        )
    rated = {name: value for name, value in zip(names, values) if value != MISSING}
    labels = schema.check(rated, source, line, "label")
    system, turns = _split(text, source, line)
    turns[-1] = Turn(Role.assistant, turns[-1].text, labels)
    if SteerLMTemplate(schema).attribute_prompt(system, turns) != text:
        raise DataError(
            source,
            line,
            "text",
            "does not render back to itself as the SteerLM template's attribute-model text",
            "write it as NeMo-Aligner's process_to_regression_format.py does",
        )
    return [Conversation(system, tuple(turns), f"{source}:{line}", passthrough(row, _KNOWN, source, line))]


def _split(text: str, source: str, line: int) -> tuple[str, list[Turn]]:
    """(system, turns) of a regression text: User first, alternating, ending with the rated answer."""
    head, tail = _TEMPLATE.system_prefix, _TEMPLATE.turn_suffix + _TEMPLATE.label_prefix
    if not text.startswith(head) or not text.endswith(tail):
        raise DataError(
            source, line, "text", f"must start with {head!r} and end with {tail!r} (the rated answer's label prefix)"
        )
    parts = _TURN.split(text[len(head) : -len(tail)])
    system, roles, texts = parts[0], [Role(word) for word in parts[1::2]], parts[2::2]
    turns = []
    for index, (role, turn_text) in enumerate(zip(roles, texts)):
        expected = Role.user if index % 2 == 0 else Role.assistant
        if role != expected:
            raise DataError(
                source, line, "text", f"turn {index + 1} is {role.value}, expected {expected.value} (User first)"
            )
        turns.append(Turn(role, check_turn_text(role, turn_text, source, line, "text")))
    if not turns or turns[-1].role != Role.assistant:
        raise DataError(source, line, "text", "must end with the rated Assistant turn")
    return system, turns
