"""HelpSteer / HelpSteer2 rows (`prompt`, `response`, five 0-4 ratings) → one Conversation each.

HelpSteer2 packs the earlier turns of a multi-turn conversation into `prompt`; its dataset card
(huggingface.co/datasets/nvidia/HelpSteer2, README, "multi-turn" paragraph) gives the layout

    {user turn 1}
    <extra_id_1>Assistant
    {assistant turn 1}
    <extra_id_1>User
    {user turn 2}

and the rated final assistant turn is `response`. NeMo-Aligner's preprocess_helpsteer2_data.py keeps the
whole prompt as one user turn, so the earlier turns are context, never trained: `helpsteer2` does the same
(the default). `helpsteer2_turns` splits the prompt back into turns (the template renders the same text),
so the earlier assistant turns, which carry no attribute line, are trained like any unlabelled answer
(`sft.train_unlabelled_responses`) and annotation can label them.

The ratings read are the schema's: all five for HelpSteer2's schema (or a larger one, NeMo-Aligner's nine),
only `helpfulness` for NeMo-Aligner's `--only_helpfulness` schema (`attributes=[helpfulness]`, whose files
may also carry just that column).
"""

from __future__ import annotations

import re
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

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
TURN_MARKER = "<extra_id_1>"
_TURN_DELIMITER = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


def split_helpsteer2_prompt(prompt: str, source: str, line: int) -> list[Turn]:
    """The turns packed in a HelpSteer2 `prompt`: User first, alternating, ending with a User turn.

    A marker not in the card's exact form (`\\n<extra_id_1>User\\n` / `\\n<extra_id_1>Assistant\\n`), roles
    that do not alternate, or an empty earlier assistant turn raise DataError on field 'prompt' rather
    than being guessed at.
    """
    parts = _TURN_DELIMITER.split(prompt)
    texts, roles = parts[0::2], [Role.user] + [Role(word) for word in parts[1::2]]
    turns = []
    for index, (role, text) in enumerate(zip(roles, texts)):
        if TURN_MARKER in text:
            raise DataError(
                source,
                line,
                "prompt",
                f"turn {index + 1} contains a {TURN_MARKER} marker not of the "
                "form '\\n<extra_id_1>User\\n' or '\\n<extra_id_1>Assistant\\n'",
                "fix the marker, or read the file with format 'helpsteer' (no turn splitting)",
            )
        expected = Role.user if index % 2 == 0 else Role.assistant
        if role != expected:
            raise DataError(
                source,
                line,
                "prompt",
                f"turn {index + 1} is {role.value}, expected {expected.value} "
                "(turns must alternate, starting with User)",
            )
        if role == Role.assistant and not text.strip():
            raise DataError(source, line, "prompt", f"turn {index + 1} is an empty assistant turn")
        turns.append(Turn(role, text))
    if turns[-1].role != Role.user:
        raise DataError(
            source, line, "prompt", "the prompt ends with an Assistant turn; the rated response must follow a User turn"
        )
    return turns


def conversations_from_helpsteer(
    row: Mapping[str, object], schema: AttributeSchema, source: str, line: int, split_turns: bool
) -> list[Conversation]:
    """One Conversation: the prompt turn(s), then the response labelled with the row's ratings.

    The HelpSteer ratings the schema rates are required; any other column named like a schema attribute is
    read as a label too (as NeMo-Aligner's format_label does), a rating the schema leaves out of its known
    schema is not read, and the remaining columns pass through to `extra`.
    """
    prompt = require_string(row, "prompt", source, line)
    response = require_response(row, "response", source, line)
    required = [name for name in HELPSTEER_ATTRIBUTES if name in schema.attributes]
    if not required:
        raise DataError(
            source,
            line,
            None,
            f"schema '{schema.name}' rates none of the HelpSteer attributes ({', '.join(HELPSTEER_ATTRIBUTES)})",
            "use attributes=helpsteer2 (or a schema with some of them, e.g. attributes.attributes=[helpfulness])",
        )
    for name in required:
        if row.get(name) is None:
            raise DataError(source, line, name, "missing rating", f"give every row its {name} rating (0-4)")
    rated = {
        key: value
        for key, value in row.items()
        if key in HELPSTEER_ATTRIBUTES or key in schema.attributes or key in schema.left_out
    }
    labels = check_labels(schema, rated, source, line)
    prompt_turns = split_helpsteer2_prompt(prompt, source, line) if split_turns else [Turn(Role.user, prompt)]
    known = frozenset({"prompt", "response", *rated})
    return [
        Conversation(
            DEFAULT_SYSTEM_PROMPT,
            (*prompt_turns, Turn(Role.assistant, response, labels)),
            f"{source}:{line}",
            passthrough(row, known, source, line),
        )
    ]
