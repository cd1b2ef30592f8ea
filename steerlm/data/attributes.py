"""Attribute schemas: which attributes a dataset rates, their fixed order and their range.

A schema turns label dicts into the SteerLM attribute string (`helpfulness:4,correctness:3,…`, in the
schema's order) and back, and checks every value. A missing value is explicit: `None` in memory,
omitted from the attribute string, and -100 in regression targets (NeMo-Aligner's marker).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import cast

from steerlm.errors import DataError

MISSING = -100.0
Labels = dict[str, "float | None"]

# The shipped schemas' attributes (steerlm/conf/attributes/*.yaml; tests/test_config.py keeps them equal).
KNOWN_SCHEMAS: dict[str, tuple[str, ...]] = {
    "helpsteer2": ("helpfulness", "correctness", "coherence", "complexity", "verbosity"),
    "steerlm_oasst": (
        "quality",
        "toxicity",
        "humor",
        "creativity",
        "helpfulness",
        "correctness",
        "coherence",
        "complexity",
        "verbosity",
    ),
    "steerlm_paper": ("quality", "toxicity", "violence", "helpfulness", "creativity", "humor", "not_appropriate"),
}

# SteerLM's "best response" request per shipped schema (`attributes.request_defaults: null` picks it): what a
# steerable model is asked for every attribute a request leaves unset (chat, serve, an exported chat template)
# and the steering evaluation's base. A SteerLM model is trained on complete attribute lines, so a partial line
# is a prompt it has never seen: the synthetic world's stage-3 model answers one with an empty response.
# HelpSteer2's is Nemotron-4-340B-Reward's documented default (moderate complexity and verbosity); NeMo-Aligner's
# nine add the OASST attributes at their best (quality high; toxicity, humor, creativity off); the paper's 0-9
# scale likewise.
BEST_RESPONSE: dict[str, dict[str, float]] = {
    "helpsteer2": {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2},
    "steerlm_oasst": {
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
    "steerlm_paper": {
        "quality": 9,
        "toxicity": 0,
        "violence": 0,
        "helpfulness": 9,
        "creativity": 0,
        "humor": 0,
        "not_appropriate": 0,
    },
}


def left_out_attributes(attributes: tuple[str, ...]) -> tuple[str, ...]:
    """The attributes a custom schema leaves out of the known schemas it is part of (e.g. HelpSteer2's
    correctness … verbosity for NeMo-Aligner's helpfulness-only schema): data rating them is still read, those
    ratings are not. Empty for a known schema and for a schema that is part of none."""
    chosen = set(attributes)
    if tuple(attributes) in KNOWN_SCHEMAS.values():
        return ()
    containing = [known for known in KNOWN_SCHEMAS.values() if chosen < set(known)]
    return tuple(sorted({name for known in containing for name in known} - chosen))


class ValueFault(str, Enum):
    """Why a value is not one of a schema's: the one test that labels (`check`), request defaults
    (`value_problem`) and inference requests (`steerlm.inference.steering.check_attributes`) share, each
    wording its own error."""

    unknown_attribute = "unknown_attribute"
    not_a_number = "not_a_number"
    out_of_range = "out_of_range"
    not_an_integer = "not_an_integer"


@dataclass(frozen=True)
class AttributeSchema:
    name: str
    attributes: tuple[str, ...]
    min_value: float = 0.0
    max_value: float = 4.0
    integer: bool = True
    # Labels of these are left out, not refused: the rest of the known schemas a custom schema is part of
    # (`left_out_attributes`, filled by the config's `AttributesConfig.schema`).
    left_out: tuple[str, ...] = ()
    # (name, value) pairs a steerable model is asked for where a request sets nothing (`BEST_RESPONSE`)
    defaults: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"schema {self.name!r}: attributes must be unique and non-empty, got {self.attributes}")
        if any(not a or any(c in a for c in ":,\n") for a in self.attributes):
            raise ValueError(f"schema {self.name!r}: attribute names may not be empty or contain ':', ',' or newlines")
        if not self.min_value < self.max_value:
            raise ValueError(f"schema {self.name!r}: min_value must be below max_value")
        for name, value in self.defaults:
            problem = self.value_problem(name, value)
            if problem:
                raise ValueError(f"schema {self.name!r}: default {name}={value!r} {problem}")

    def value_fault(self, name: str, value: object) -> ValueFault | None:
        """What is wrong with `name=value` for this schema (None: nothing)."""
        if name not in self.attributes:
            return ValueFault.unknown_attribute
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return ValueFault.not_a_number
        if not self.min_value <= value <= self.max_value:
            return ValueFault.out_of_range
        if self.integer and value != int(value):
            return ValueFault.not_an_integer
        return None

    def value_problem(self, name: str, value: object) -> str | None:
        """Why `name=value` is not a value of this schema, in words (None when it is)."""
        fault = self.value_fault(name, value)
        return None if fault is None else self.describe(fault)

    def describe(self, fault: ValueFault) -> str:
        """The fault in words, to follow `name=value`."""
        return {
            ValueFault.unknown_attribute: f"is not an attribute of the schema ({', '.join(self.attributes)})",
            ValueFault.not_a_number: "is not a number",
            ValueFault.out_of_range: f"is outside [{self.min_value:g}, {self.max_value:g}]",
            ValueFault.not_an_integer: "is not an integer",
        }[fault]

    @property
    def default_labels(self) -> Labels:
        """`defaults` as labels in schema order (empty when the schema has none)."""
        given = dict(self.defaults)
        return {name: _typed(self, given[name]) for name in self.attributes if name in given}

    def check(
        self, labels: Mapping[str, object], source: str = "<labels>", line: int | None = None, field: str = "label"
    ) -> Labels:
        """Validated labels in schema order; absent attributes become None (missing), `left_out` ones are
        not read."""
        unknown = [name for name in labels if name not in self.attributes and name not in self.left_out]
        if unknown:
            raise DataError(
                source,
                line,
                field,
                f"unknown attribute {unknown[0]!r} for schema {self.name!r}",
                f"use only {', '.join(self.attributes)} (or configure a custom schema)",
            )
        out: Labels = {}
        for name in self.attributes:
            value = labels.get(name)
            if value is None or value == MISSING:
                out[name] = None
                continue
            fault = self.value_fault(name, value)
            if fault == ValueFault.out_of_range:
                reason = f"{name}={value!r} {self.describe(fault)} of schema {self.name!r}"
                raise DataError(source, line, field, reason, "fix the label or the schema's range")
            if fault is not None:
                which = "" if fault == ValueFault.not_a_number else f" (schema {self.name!r})"
                raise DataError(source, line, field, f"{name}={value!r} {self.describe(fault)}{which}")
            out[name] = _typed(self, cast(float, value))
        return out

    def format(self, labels: Mapping[str, float | None]) -> str:
        """`name:value` pairs of the present values, comma-joined in schema order."""
        present = ((name, labels.get(name)) for name in self.attributes)
        return ",".join(f"{name}:{_number(value)}" for name, value in present if value is not None)

    def parse(self, text: str, source: str = "<labels>", line: int | None = None, field: str = "label") -> Labels:
        """Inverse of `format` (checked)."""
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.strip().split(","))):
            name, sep, value = item.partition(":")
            if not sep:
                raise DataError(source, line, field, f"{item!r} is not name:value")
            if name in values:
                raise DataError(source, line, field, f"attribute {name!r} appears twice")
            try:
                values[name] = float(value)
            except ValueError:
                raise DataError(source, line, field, f"{name}={value!r} is not a number") from None
        return self.check(values, source, line, field)

    def targets(self, labels: Labels) -> list[float]:
        """Regression targets in schema order, MISSING (-100) where unlabelled."""
        return [MISSING if (value := labels.get(name)) is None else float(value) for name in self.attributes]

    def clip_round(self, scores: Mapping[str, float | None]) -> Labels:
        """Model scores → labels: clipped to the range and, for integer schemas, rounded (as NeMo-Aligner).
        A None or NaN score (a generative APM that did not write that attribute) becomes a missing label."""
        out: Labels = {}
        for name in self.attributes:
            score = scores[name]
            if score is None or math.isnan(float(score)):
                out[name] = None
                continue
            value = min(max(float(score), self.min_value), self.max_value)
            out[name] = int(round(value)) if self.integer else value
        return out


def _typed(schema: AttributeSchema, value: float) -> float:
    return int(value) if schema.integer else float(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
