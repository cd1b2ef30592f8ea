"""An attribute re-predicted from the other labels: a least-squares fit learned on rated data.

An overall attribute (OASST's quality) is rated from the others: a response that states a wrong fact is worse.
When annotation replaces one of those others (the Bayes judge's correctness), the APM's overall score no longer
agrees with it: the APM could not see the wrong fact, so its quality stays high. The fit re-predicts the overall
attribute from the labels written next to it, with the relation the human ratings show (intercept and one
weight per other attribute), so a conversation judged incorrect is also judged worse, as a rater would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from steerlm.data.attributes import AttributeSchema
from steerlm.data.records import Conversation, Role
from steerlm.errors import DataError


@dataclass(frozen=True)
class LinearFit:
    attribute: str
    inputs: tuple[str, ...]
    intercept: float
    weights: tuple[float, ...]
    rows: int  # rated turns the fit was learned on
    pearson: float  # of its predictions with the ratings on those turns

    def predict(self, labels: Mapping[str, float | None]) -> float:
        """The fitted value; NaN when an input is missing."""
        values = [labels.get(name) for name in self.inputs]
        present = [float(value) for value in values if value is not None]
        if len(present) < len(values):
            return math.nan
        return self.intercept + sum(w * v for w, v in zip(self.weights, present))

    def describe(self) -> str:
        terms = " ".join(f"{w:+.3f}·{name}" for w, name in zip(self.weights, self.inputs) if round(w, 3))
        return f"{self.attribute} = {self.intercept:.3f} {terms} (Pearson {self.pearson:.3f} on {self.rows} ratings)"


def fit_linear(
    records: Iterable[Conversation], schema: AttributeSchema, attribute: str, exclude: Sequence[str] = ()
) -> LinearFit:
    """Least squares of `attribute` on every other attribute of `schema` but `exclude`, over the assistant turns
    that rate all of them. DataError when too few do to fit one weight each."""
    inputs = tuple(name for name in schema.attributes if name != attribute and name not in exclude)
    rows, targets, source = [], [], "<records>"
    for record in records:
        source = record.source.rsplit(":", 1)[0] or source
        for turn in record.turns:
            labels = turn.labels
            if turn.role != Role.assistant or labels is None:
                continue
            values = [labels.get(name) for name in (*inputs, attribute)]
            if all(value is not None for value in values):
                rows.append([1.0, *(float(v) for v in values[:-1])])  # type: ignore[arg-type]
                targets.append(float(values[-1]))  # type: ignore[arg-type]
    if len(rows) <= 2 * (len(inputs) + 1):
        raise DataError(
            source,
            None,
            None,
            f"{len(rows)} assistant turns rate {attribute} and all of {', '.join(inputs)}; "
            f"fitting {len(inputs) + 1} coefficients needs more than {2 * (len(inputs) + 1)}",
            "pass rated data with complete labels (judge.refit_data), or leave the attribute out of judge.refit",
        )
    design, target = np.array(rows), np.array(targets)
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    fitted = design @ solution
    pearson = float(np.corrcoef(fitted, target)[0, 1]) if fitted.std() > 0 and target.std() > 0 else math.nan
    return LinearFit(attribute, inputs, float(solution[0]), tuple(float(w) for w in solution[1:]), len(rows), pearson)
