"""What a SteerLM model was trained to answer: the attribute lines of its training data.

Stage 3 (and a SteerLM 2.0 run) writes them to `attribute_lines.json` in its run directory before its first step
(and into its `eval.json`); an export carries them to Hugging Face and an import back. The steering evaluation and the
pipeline's report print, beside each figure, how many trained lines carried the requested value; chat and the
server name a requested value none carried. A request for a value no line carried asks the model for something it
never saw: on the synthetic world's default route the APM never labels quality 4, yet SteerLM's best-response
request asks for quality 4 (docs/evaluate_steering.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.records import Conversation, Role
from steerlm.errors import DataError
from steerlm.files import atomic_write_text

ATTRIBUTE_LINES_FILE = "attribute_lines.json"


@dataclass(frozen=True)
class AttributeLines:
    """`lines` attribute lines (stage 3: one per labelled assistant turn; SteerLM 2.0: one per trained response), and
    per attribute how many carry each value (`f"{value:g}"`)."""

    lines: int
    levels: dict[str, dict[str, int]]

    def count(self, attribute: str, value: float) -> int:
        return self.levels.get(attribute, {}).get(f"{value:g}", 0)

    def values(self, attribute: str) -> str:
        """The values some line carried for `attribute`, comma-joined ("none" when no line set it)."""
        return ", ".join(self.levels.get(attribute, {})) or "none"

    def of_request(self, request: Labels) -> dict[str, int]:
        """How many trained lines carry each requested value."""
        return {name: self.count(name, value) for name, value in request.items() if value is not None}


def count_lines(labelled: Iterable[Labels], schema: AttributeSchema) -> AttributeLines:
    """One attribute line per item of `labelled`, counted by value per attribute."""
    lines = 0
    levels: dict[str, Counter[str]] = {name: Counter() for name in schema.attributes}
    for labels in labelled:
        lines += 1
        for name in schema.attributes:
            value = labels.get(name)
            if value is not None:
                levels[name][f"{value:g}"] += 1
    return AttributeLines(lines, {name: dict(sorted(counts.items())) for name, counts in levels.items()})


def attribute_lines(conversations: Iterable[Conversation], schema: AttributeSchema) -> AttributeLines:
    """The attribute lines the SteerLM template writes for `conversations`: one per labelled assistant turn."""
    return count_lines(
        (
            turn.labels
            for conversation in conversations
            for turn in conversation.turns
            if turn.role == Role.assistant and turn.labels is not None
        ),
        schema,
    )


def write_attribute_lines(run_dir: Path, lines: AttributeLines) -> None:
    """`<run_dir>/attribute_lines.json`, which `trained_attribute_lines` reads for any checkpoint of the run."""
    atomic_write_text(run_dir / ATTRIBUTE_LINES_FILE, json.dumps(asdict(lines), indent=2) + "\n")


def from_json(payload: Mapping, source: str) -> AttributeLines:
    try:
        return AttributeLines(int(payload["lines"]), {k: dict(v) for k, v in payload["levels"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(
            source,
            None,
            "attribute_lines",
            f"is not a lines/levels record ({error})",
            "restore it from the run's eval.json (its attribute_lines) or delete it",
        ) from None


def trained_attribute_lines(checkpoint: Path) -> AttributeLines | None:
    """The attribute lines the SFT run of `checkpoint` (a run directory or one of its `checkpoints/step_*`)
    recorded; None when it recorded none: the plain-SFT baseline, a run from before they were recorded, or a model
    imported from elsewhere than a steerlm export."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    file = run_dir / ATTRIBUTE_LINES_FILE
    if not file.is_file():
        return None
    try:
        payload = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise DataError(
            str(file),
            error.lineno,
            "attribute_lines",
            f"is not JSON ({error.msg})",
            "restore it from the run's eval.json (its attribute_lines) or delete it",
        ) from None
    return from_json(payload, str(file))
