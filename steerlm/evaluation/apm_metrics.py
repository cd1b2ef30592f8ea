"""Attribute-model metrics per attribute: MAE, RMSE, Pearson, Spearman and exact match after rounding.

Computed over labelled values only (MISSING targets are skipped), so every figure says on how many
values it stands. With merge weights the merged reward is compared with the same weighted sum of the
labels, over the rows that have every label with a non-zero weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from steerlm.data.attributes import MISSING, AttributeSchema

METRICS = ("mae", "rmse", "pearson", "spearman", "exact_match")
REWARD = "reward"  # the merged score's key in metrics and in `AttributeScorer.score` rows


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two aligned 1-D arrays; NaN when either side is constant or shorter than 2."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties share their mean rank); NaN when either side is constant."""
    return pearson(_ranks(a), _ranks(b))


def _regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict:
    """count, MAE, RMSE, Pearson and Spearman of two aligned 1-D arrays (NaN where undefined)."""
    if not len(target):
        return {
            "count": 0,
            "mae": float("nan"),
            "rmse": float("nan"),
            "pearson": float("nan"),
            "spearman": float("nan"),
        }
    return {
        "count": len(target),
        "mae": float(np.abs(predicted - target).mean()),
        "rmse": float(np.sqrt(((predicted - target) ** 2).mean())),
        "pearson": pearson(predicted, target),
        "spearman": spearman(predicted, target),
    }


def attribute_metrics(predictions: np.ndarray, targets: np.ndarray, schema: AttributeSchema) -> dict:
    """`predictions`, `targets`: `[rows, attributes]` in schema order. Returns per-attribute metrics
    and their means over attributes.

    A NaN prediction (a generative APM that did not write that attribute) is left out of the figures and
    counted as `unpredicted`: the metrics then stand on `count` labelled and predicted values.
    """
    per_attribute = {}
    for column, name in enumerate(schema.attributes):
        labelled = targets[:, column] != MISSING
        predicted_mask = labelled & ~np.isnan(predictions[:, column])
        predicted, target = predictions[predicted_mask, column], targets[predicted_mask, column]
        rounded = np.clip(np.round(predicted), schema.min_value, schema.max_value)
        per_attribute[name] = {
            **_regression_metrics(predicted, target),
            "exact_match": float((rounded == target).mean()) if len(target) else float("nan"),
            "unpredicted": int(labelled.sum() - predicted_mask.sum()),
        }
    means = {metric: float(np.nanmean([m[metric] for m in per_attribute.values()])) for metric in METRICS}
    return {"attributes": per_attribute, "mean": means}


def merged_reward(scores: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """`[rows]` weights · scores over the attributes with a non-zero weight (NaN when one of those is NaN)."""
    vector = np.asarray(weights, dtype=np.float64)
    return scores[:, vector != 0] @ vector[vector != 0]


def reward_metrics(predictions: np.ndarray, targets: np.ndarray, weights: Sequence[float]) -> dict:
    """The merged reward (`predictions @ weights`) against `targets @ weights`, on rows where every
    attribute with a non-zero weight is labelled; also the mean predicted reward over all rows."""
    vector = np.asarray(weights, dtype=np.float64)
    used = vector != 0
    complete = (targets[:, used] != MISSING).all(axis=1) & ~np.isnan(predictions[:, used]).any(axis=1)
    rewards = merged_reward(predictions, weights)
    return {
        **_regression_metrics(rewards[complete], targets[complete] @ vector),
        "mean_predicted": float(np.nanmean(rewards)) if (~np.isnan(rewards)).any() else float("nan"),
    }


def metric_scalars(metrics: dict) -> dict[str, float]:
    """Pearson and MAE per attribute, their means and the reward's, as flat `metric/name` scalars to log."""
    rows = {**metrics["attributes"], "mean": metrics["mean"]}
    if REWARD in metrics:
        rows[REWARD] = metrics[REWARD]
    return {f"{metric}/{name}": values[metric] for name, values in rows.items() for metric in ("pearson", "mae")}
