"""The attribute schema's config (`attributes` group, conf/attributes/*.yaml): names in their fixed order, the
value range, and what a steerable model is asked where a request sets nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from steerlm.data.attributes import BEST_RESPONSE, AttributeSchema, left_out_attributes
from steerlm.errors import ConfigError


@dataclass
class AttributesConfig:
    """An attribute schema: names in their fixed order, the value range, integer or real values.

    Shipped: conf/attributes/{helpsteer2,steerlm_oasst,steerlm_paper}.yaml; any other set is a custom
    schema (`attributes.name=mine attributes.attributes=[a,b] attributes.max_value=9`).
    """

    name: str = "helpsteer2"
    attributes: list[str] = field(
        default_factory=lambda: ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    )
    min_value: float = 0.0
    max_value: float = 4.0
    integer: bool = True
    # What a steerable model is asked for each attribute a request leaves unset (chat, serve, exported chat
    # templates) and the steering evaluation's base. null: SteerLM's best response (`BEST_RESPONSE`) when the
    # schema is a shipped one or part of one (checkpoints saved before this key existed included); {}: none.
    request_defaults: Optional[dict[str, float]] = None

    def resolved_defaults(self) -> dict[str, float]:
        """`request_defaults`, or for null the best response of the shipped schema this one is (by name) or is
        part of (NeMo-Aligner's helpfulness-only `attributes=[helpfulness]`), its values within this range;
        none when no shipped schema fits or two that do disagree."""
        if self.request_defaults is not None:
            return dict(self.request_defaults)
        chosen = set(self.attributes)
        fitting = {
            known: {name: best[name] for name in self.attributes}
            for known, best in BEST_RESPONSE.items()
            if chosen <= set(best) and all(self.min_value <= best[name] <= self.max_value for name in chosen)
        }
        if self.name in fitting:
            return fitting[self.name]
        found = list(fitting.values())
        return found[0] if found and all(values == found[0] for values in found) else {}

    def schema(self) -> AttributeSchema:
        """The schema; a custom one that is part of a known schema reads that schema's data, leaving the other
        attributes' ratings out (NeMo-Aligner's helpfulness-only HelpSteer2 is `attributes=[helpfulness]`)."""
        attributes = tuple(self.attributes)
        try:
            schema = AttributeSchema(
                self.name, attributes, self.min_value, self.max_value, self.integer, left_out_attributes(attributes)
            )
        except ValueError as error:
            raise ConfigError(
                "attributes",
                {"name": self.name, "attributes": self.attributes},
                str(error),
                "give unique names without ':' ',' or newlines, and min_value < max_value",
            ) from None
        defaults = self.resolved_defaults()
        for name, value in defaults.items():
            problem = schema.value_problem(name, value)
            if problem:
                raise ConfigError(
                    f"attributes.request_defaults.{name}",
                    value,
                    problem,
                    f"give values of schema '{self.name}' ({schema.min_value:g} to {schema.max_value:g}) "
                    "for its attributes, or attributes.request_defaults={} for none",
                )
        return replace(schema, defaults=tuple(defaults.items()))

    def validate(self) -> None:
        self.schema()
