"""Steerability: does asking for more of an attribute give responses with more of it?

One attribute at a time is swept over the requested levels while every other attribute stays at its
base level; each prompt gets one greedy (or seeded) response per level. What came out is measured by
response length (words) and, for prompts of the synthetic world, by its oracle's true level of every
attribute. Per swept attribute the report gives, for each requested level, the mean measured level of
that attribute, the share of responses whose measured level is exactly the requested one, the mean absolute
change of the others from the first level (they should not move), and the Spearman correlation between
requested and measured levels over all (prompt, level) pairs. `base_report` measures the base request itself
(SteerLM's "best response" setting): every attribute's mean level and exact-match share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from steerlm.data.attributes import Labels
from steerlm.data.records import Conversation
from steerlm.data.synthetic.oracle import Oracle
from steerlm.evaluation.apm_metrics import spearman


@dataclass(frozen=True)
class Generated:
    prompt: Conversation
    requested: Labels
    text: str
    finish_reason: str


def _words(text: str) -> int:
    return len(text.split())


def sweep_requests(base: Labels, attribute: str, levels: Sequence[float]) -> list[Labels]:
    """The requests of one sweep: `base` with `attribute` set to each of `levels`."""
    return [{**base, attribute: level} for level in levels]


def sweep_report(
    generated: Sequence[Generated], attribute: str, levels: Sequence[float], oracle: Oracle | None, samples: int
) -> dict:
    """The measured effect of requesting each of `levels` for `attribute` (see the module docstring), from the
    responses generated for `sweep_requests(base, attribute, levels)`."""
    report: dict = {"levels": {}}
    requested_all, measured_all = [], []
    base_scores = None
    for level in levels:
        rows = [g for g in generated if g.requested[attribute] == level]
        entry = {
            "mean_words": float(np.mean([_words(g.text) for g in rows])),
            "stopped": sum(g.finish_reason == "stop" for g in rows) / len(rows),
            "samples": [g.text for g in rows[:samples]],
        }
        if oracle is not None:
            scores = [oracle.score(list(g.prompt.turns), g.text) for g in rows]
            measured = [s[attribute] for s in scores]
            entry["mean_measured"] = float(np.mean(measured))
            entry["exact_match"] = float(np.mean([m == level for m in measured]))
            others = {name: float(np.mean([s[name] for s in scores])) for name in scores[0] if name != attribute}
            entry["others"] = others
            requested_all += [level] * len(rows)
            measured_all += measured
            base_scores = base_scores or others
            entry["others_mean_abs_change"] = float(np.mean([abs(others[k] - base_scores[k]) for k in others]))
        report["levels"][f"{level:g}"] = entry
    first, last = report["levels"][f"{levels[0]:g}"], report["levels"][f"{levels[-1]:g}"]
    report["words_change"] = last["mean_words"] - first["mean_words"]
    if oracle is not None:
        report["spearman"] = spearman(np.array(requested_all), np.array(measured_all))
        report["measured_change"] = last["mean_measured"] - first["mean_measured"]
        report["min_exact_match"] = min(entry["exact_match"] for entry in report["levels"].values())
    return report


def base_report(generated: Sequence[Generated], oracle: Oracle | None, samples: int) -> dict:
    """What the responses to one request (the same labels for every prompt) are: words, and with an oracle
    every attribute's mean level and the share of responses at exactly the requested level."""
    report: dict = {
        "requested": dict(generated[0].requested),
        "mean_words": float(np.mean([_words(g.text) for g in generated])),
        "stopped": sum(g.finish_reason == "stop" for g in generated) / len(generated),
        "samples": [g.text for g in generated[:samples]],
    }
    if oracle is not None:
        scores = [oracle.score(list(g.prompt.turns), g.text) for g in generated]
        report["mean_measured"] = {name: float(np.mean([s[name] for s in scores])) for name in scores[0]}
        report["exact_match"] = {
            name: float(np.mean([s[name] == g.requested[name] for s, g in zip(scores, generated)]))
            for name in scores[0]
            if name in generated[0].requested
        }
    return report


def format_report(reports: dict[str, dict]) -> str:
    """A plain-text table: per swept attribute, each level's mean measured level (or words)."""
    lines = []
    for attribute, report in reports.items():
        cells = []
        for level, entry in report["levels"].items():
            measured = f"{entry['mean_measured']:.2f}" if "mean_measured" in entry else "-"
            exact = f" {entry['exact_match']:.0%}" if "exact_match" in entry else ""
            cells.append(f"{level}→{measured}{exact} ({entry['mean_words']:.0f}w)")
        spearman_text = f"  spearman {report['spearman']:.3f}" if "spearman" in report else ""
        lines.append(f"{attribute:12s} " + "  ".join(cells) + spearman_text)
    return "\n".join(lines)
