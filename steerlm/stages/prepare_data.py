"""Convert a dataset (HelpSteer, HelpSteer2, OASST trees, plain or conversation JSONL) to NeMo-Aligner
conversation JSONL and summarise it: rows in/out, rejected rows with reasons, attribute histograms."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from steerlm.config import ConfigError, PrepareDataConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.readers import BadRowPolicy, ReadStats, RejectSink, read_records, write_conversation_jsonl
from steerlm.data.records import Conversation, Role
from steerlm.data.synthetic.splits import format_synthetic_summary, write_synthetic
from steerlm.files import atomic_write_text

MISSING_KEY = "missing"


@dataclass(frozen=True)
class PrepareSummary:
    input: str
    output: str
    format: str
    schema: str
    rows_in: int
    rows_out: int
    rejected: int
    reasons: dict[str, int]
    rejects_file: str | None
    labelled_turns: int
    histograms: dict[str, dict[str, int]]  # attribute → value (or "missing") → labelled assistant turns


def _histogram_pass(
    records: Iterator[Conversation], schema: AttributeSchema, histograms: dict[str, Counter], turns: Counter
) -> Iterator[Conversation]:
    for record in records:
        for turn in record.turns:
            if turn.role == Role.assistant and turn.labels is not None:
                turns["labelled"] += 1
                for name in schema.attributes:
                    value = turn.labels.get(name)
                    histograms[name][MISSING_KEY if value is None else f"{value:g}"] += 1
        yield record


def run(cfg: PrepareDataConfig) -> PrepareSummary | dict:
    """Convert `cfg.input` (returns a PrepareSummary) or, with `cfg.synthetic`, generate the synthetic
    world into the directory `cfg.output` (returns its summary dict)."""
    cfg.validate()
    if cfg.synthetic is not None:
        return write_synthetic(cfg.synthetic, cfg.output)
    if cfg.input is None:  # validate() already refuses this; checked again for the type checker
        raise ConfigError("input", None, "is required", "pass input=<path> (or data=synthetic)")
    schema = cfg.attributes.schema()
    stats = ReadStats()
    histograms: dict[str, Counter[str]] = {name: Counter() for name in schema.attributes}
    turns: Counter = Counter()
    rejects_path = Path(cfg.rejects or f"{cfg.output}.rejects.jsonl")
    reject = cfg.on_bad_row == BadRowPolicy.reject
    with RejectSink(rejects_path) if reject else contextlib.nullcontext() as sink:
        records = read_records(cfg.input, cfg.format, schema, cfg.on_bad_row, sink if reject else None, stats)
        write_conversation_jsonl(_histogram_pass(records, schema, histograms, turns), cfg.output, schema)
    summary = PrepareSummary(
        input=cfg.input,
        output=cfg.output,
        format=cfg.format.value,
        schema=schema.name,
        rows_in=stats.rows_in,
        rows_out=stats.rows_out,
        rejected=stats.rejected,
        reasons=dict(stats.reasons),
        rejects_file=str(rejects_path) if reject else None,
        labelled_turns=turns["labelled"],
        histograms={name: dict(sorted(counts.items())) for name, counts in histograms.items()},
    )
    _write_json(Path(f"{cfg.output}.summary.json"), asdict(summary))
    return summary


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def format_summary(summary: PrepareSummary | dict) -> str:
    """Human-readable summary (what the recipe prints)."""
    if isinstance(summary, dict):
        return format_synthetic_summary(summary)
    lines = [
        f"{summary.input} ({summary.format}) -> {summary.output} (conversation JSONL, schema {summary.schema})",
        f"rows in: {summary.rows_in}  conversations out: {summary.rows_out}  rejected: {summary.rejected}",
    ]
    if summary.rejected:
        reasons = ", ".join(f"{field}: {count}" for field, count in sorted(summary.reasons.items()))
        lines.append(f"rejected by field: {reasons}  (rows with reasons in {summary.rejects_file})")
    lines.append(f"labelled assistant turns: {summary.labelled_turns}")
    for name, counts in summary.histograms.items():
        cells = "  ".join(f"{value}:{count}" for value, count in counts.items()) or "-"
        lines.append(f"  {name:>16}  {cells}")
    return "\n".join(lines)
