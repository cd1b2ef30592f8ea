"""Attribute-model metrics per attribute: MAE, RMSE, Pearson, Spearman and exact match after rounding.

Computed over labelled values only (MISSING targets are skipped), so every figure says on how many
values it stands.
"""

from __future__ import annotations

import numpy as np

from steerlm.data.attributes import MISSING, AttributeSchema


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def attribute_metrics(predictions: np.ndarray, targets: np.ndarray, schema: AttributeSchema) -> dict:
    """`predictions`, `targets`: `[rows, attributes]` in schema order. Returns per-attribute metrics
    and their means over attributes."""
    per_attribute = {}
    for column, name in enumerate(schema.attributes):
        labelled = targets[:, column] != MISSING
        predicted, target = predictions[labelled, column], targets[labelled, column]
        rounded = np.clip(np.round(predicted), schema.min_value, schema.max_value)
        per_attribute[name] = {
            "count": int(labelled.sum()),
            "mae": float(np.abs(predicted - target).mean()) if labelled.any() else float("nan"),
            "rmse": float(np.sqrt(((predicted - target) ** 2).mean())) if labelled.any() else float("nan"),
            "pearson": _correlation(predicted, target),
            "spearman": _correlation(_ranks(predicted), _ranks(target)) if labelled.any() else float("nan"),
            "exact_match": float((rounded == target).mean()) if labelled.any() else float("nan"),
        }
    means = {metric: float(np.nanmean([m[metric] for m in per_attribute.values()]))
             for metric in ("mae", "rmse", "pearson", "spearman", "exact_match")}
    return {"attributes": per_attribute, "mean": means}
