"""Stage 2: annotate a dataset with a trained APM — data-parallel, resumable, nothing lost.

Rank 0 reads the input (any reader format) shard by shard (`shard_size` input rows) and shares each shard;
every assistant turn that needs labels becomes one APM input; inputs are bucketed by length into batches whose
composition depends only on the shard, so any data-parallel size computes exactly the same numbers; batch b
goes to data-parallel rank b mod dp. Finished shards are written as atomic part files listed in a manifest
(`<output>.parts/manifest.json`); the merged output is written atomically at the end.

A rerun reuses a finished shard only when nothing that shaped it changed: the manifest records each shard's
input fingerprint (its rows' count, bytes and SHA-256, rejected rows included, so a fixed reject re-annotates
its shard) and the settings of the run (the APM checkpoint's step and file checksums, mode, format, shard size,
schema, template, seq_length, micro-batch size, merge weights). A changed shard is annotated again; changed
settings re-annotate every shard; both are logged. The input is read whole on every run, so the rejects file
and the row counts describe the current input, and the summary counts the whole output, not one invocation.

With `judge.checkpoint`, the attributes in `judge.attributes` are judged by Bayes' rule with an
attribute-conditioned model (steerlm/inference/judge.py) instead of read off the APM, the other attributes held
at the values the turn gets written with; then each attribute in `judge.refit` is re-predicted from the written
labels by a least-squares fit on `judge.refit_data` (steerlm/data/label_fit.py). A conversation's turns are
judged in order, each reading the earlier ones with their final labels. The judge's checkpoint, its
settings and the fits' coefficients are part of the run's settings. `attribute_scores` holds the posterior means
and fitted values for those attributes, the APM's raw scores for the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from steerlm import runtime
from steerlm.checkpoint.integrity import checkpoint_identity
from steerlm.checkpoint.sharded import read_meta
from steerlm.config.annotate import AnnotateConfig, AnnotateMode
from steerlm.config.validation import data_parallel_size, validate_model_layout
from steerlm.data.apm import AttributeExample
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.label_fit import LinearFit
from steerlm.data.lengths import LengthStats
from steerlm.data.readers import BadRowPolicy, InputRow, ReadStats, RejectSink, read_rows
from steerlm.data.records import Conversation, Role, Turn, to_conversation_json
from steerlm.files import atomic_write_text
from steerlm.inference.judge import Judging
from steerlm.inference.scoring import AttributeScorer, check_rated_attributes, open_apm_checkpoint

log = logging.getLogger(__name__)
T = TypeVar("T")
SCORES_FIELD = "attribute_scores"
REWARD_FIELD = "attribute_reward"  # with the APM's apm.merge_weights: the merged score of each scored turn
SCORE_DECIMALS = 4  # raw scores are rounded so outputs compare byte for byte across layouts
MANIFEST_FORMAT = 2  # 1 (no format field): parts named by the input's path only, never reused


@dataclass(frozen=True)
class AnnotateSummary:
    input: str
    output: str
    apm_checkpoint: str
    mode: str
    layout: str
    rows_in: int
    rows_out: int
    rejected: int
    reasons: dict[str, int]
    rejects_file: str | None
    shards: int
    shards_skipped: int
    annotated_turns: int  # in the whole output (reused shards included)
    truncated_inputs: int  # in the whole output
    seconds: float
    rows_per_s: float  # rows annotated by this invocation per second
    histograms: dict[str, dict[str, int]]
    judge: dict | None = None  # the judge's checkpoint and attributes, the fits, inputs cut to its positions


@dataclass(frozen=True)
class _Shard:
    records: list[Conversation]
    fingerprint: dict  # {"rows", "bytes", "sha256"} of the input rows it was read from


@dataclass
class _Work:
    """The parts directory (rank 0): one JSONL per finished shard and a manifest of what made each."""

    root: Path
    settings: dict

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def done(self) -> dict[int, dict]:
        """The finished shards a rerun may reuse: none when the settings changed (logged, naming them)."""
        if not self.manifest.exists():
            return {}
        try:
            saved = json.loads(self.manifest.read_text())
            if saved.get("format") != MANIFEST_FORMAT:
                log.warning("%s was written by an older steerlm: annotating every shard again", self.manifest)
                return {}
            old, shards = saved["settings"], {int(number): entry for number, entry in saved["shards"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("%s cannot be read (%r): annotating every shard again", self.manifest, error)
            return {}
        changed = [f"{key}: {old.get(key)} -> {value}" for key, value in self.settings.items() if old.get(key) != value]
        if changed:
            log.warning("changed since %s was written: %s; annotating every shard again", self.root, "; ".join(changed))
            return {}
        return shards

    def reusable(self, number: int, shard: _Shard, done: dict[int, dict]) -> bool:
        entry = done.get(number)
        if entry is None or not self.part(number).is_file():
            return False
        if entry["input"] != shard.fingerprint:
            log.warning(
                "shard %d: its input rows changed since it was annotated (%s -> %s): annotating it again",
                number,
                entry["input"],
                shard.fingerprint,
            )
            return False
        return True

    def part(self, shard: int) -> Path:
        return self.root / f"shard_{shard:06d}.jsonl"

    def finish(self, shard: int, rows: list[dict], entry: dict, done: dict[int, dict]) -> None:
        atomic_write_text(self.part(shard), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        done[shard] = entry
        self.write_manifest(done)

    def write_manifest(self, done: dict[int, dict]) -> None:
        shards = {str(number): done[number] for number in sorted(done)}
        payload = {"format": MANIFEST_FORMAT, "settings": self.settings, "shards": shards}
        atomic_write_text(self.manifest, json.dumps(payload, indent=1) + "\n")

    def drop_after(self, count: int, done: dict[int, dict]) -> None:
        """Forget parts of shards the input no longer has (it got shorter)."""
        stale = [number for number in done if number >= count]
        for number in stale:
            del done[number]
            self.part(number).unlink(missing_ok=True)
        if stale:
            self.write_manifest(done)


def _needs(mode: AnnotateMode, conversation: Conversation, index: int) -> bool:
    """Which turns get APM labels: every assistant turn (overwrite), those missing a label (fill_missing), or
    those that carry a label (relabel: NeMo-Aligner's attribute_annotate.py rule)."""
    turn = conversation.turns[index]
    if turn.role != Role.assistant:
        return False
    if mode == AnnotateMode.relabel:
        return turn.labels is not None
    return mode == AnnotateMode.overwrite or turn.labels is None or any(v is None for v in turn.labels.values())


def _annotated_rows(
    records: list[Conversation],
    examples: list[AttributeExample],
    scores: np.ndarray,
    rewards: np.ndarray | None,
    schema: AttributeSchema,
    mode: AnnotateMode,
) -> list[dict]:
    """Conversation JSONL rows: labels of the scored turns, their raw scores (and rewards) aligned with turns."""
    per_turn = {example.turn: row for example, row in zip(examples, _rounded(scores))}
    reward_of = {} if rewards is None else dict(zip((e.turn for e in examples), _rounded(rewards)))
    rows = []
    for r, record in enumerate(records):
        turns: list[Turn] = []
        raw: list[dict[str, Any] | None] = []
        for t, turn in enumerate(record.turns):
            if (r, t) not in per_turn:
                turns.append(turn)
                raw.append(None)
                continue
            values = per_turn[(r, t)]
            turns.append(Turn(turn.role, turn.text, _written_labels(turn, values, schema, mode)))
            raw.append(dict(zip(schema.attributes, values)))
        extra = {**record.extra, SCORES_FIELD: raw}
        if rewards is not None:
            extra[REWARD_FIELD] = [reward_of.get((r, t)) for t in range(len(record.turns))]
        annotated = Conversation(record.system, tuple(turns), record.source, extra)
        rows.append(to_conversation_json(annotated, schema))
    return rows


def _written_labels(turn: Turn, values: list, schema: AttributeSchema, mode: AnnotateMode) -> Labels:
    """A scored turn's labels from its (rounded) raw scores; under fill_missing its human labels win."""
    predicted = schema.clip_round(dict(zip(schema.attributes, values)))
    if mode == AnnotateMode.fill_missing and turn.labels is not None:
        predicted = {k: turn.labels[k] if turn.labels[k] is not None else v for k, v in predicted.items()}
    return predicted


def _rounded(values: np.ndarray) -> list:
    """Raw scores (a row or rows of them) rounded so outputs compare byte for byte across layouts; NaN (an
    attribute a generative APM did not write) becomes None."""
    return [
        _rounded(row) if row.ndim else None if np.isnan(row) else round(float(row), SCORE_DECIMALS) for row in values
    ]


def _shards(
    cfg: AnnotateConfig, schema: AttributeSchema, stats: ReadStats, rejects: RejectSink | None
) -> Iterator[_Shard]:
    rows = read_rows(cfg.input, cfg.format, schema, cfg.on_bad_row, rejects, stats)
    while True:
        shard = list(itertools.islice(rows, cfg.shard_size))
        if not shard:
            return
        yield _Shard([record for row in shard for record in row.records], _fingerprint(shard))


def _fingerprint(rows: list[InputRow]) -> dict:
    """Count, bytes and SHA-256 of the rows as read (a parquet row: its JSON with sorted keys)."""
    digest, size = hashlib.sha256(), 0
    for row in rows:
        raw = row.raw if isinstance(row.raw, bytes) else json.dumps(row.raw, sort_keys=True, default=str).encode()
        digest.update(raw + b"\n")
        size += len(raw) + 1
    return {"rows": len(rows), "bytes": size, "sha256": digest.hexdigest()}


def _settings(cfg: AnnotateConfig, apm_path: Path, scorer: AttributeScorer, judge: dict | None) -> dict:
    """Everything besides the input rows that shapes the output, as JSON values (`judge`: `Judging.describe()`)."""
    settings = {
        "apm_checkpoint": {"step": read_meta(apm_path).step, "files": checkpoint_identity(apm_path)},
        "mode": cfg.mode.value,
        "format": cfg.format.value,
        "shard_size": cfg.shard_size,
        "schema": asdict(scorer.schema),
        "template": asdict(scorer.template.config),
        "seq_length": scorer.seq_length,
        "micro_batch_size": scorer.micro_batch_size,
        "merge_weights": scorer.merge_weights,
        "judge": judge,
    }
    return json.loads(json.dumps(settings))  # tuples → lists, as the manifest reads back


def _broadcast(obj: T | None) -> T | None:
    """Rank 0's `obj` on every rank (the others pass None)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _broadcast_required(obj: T | None, what: str) -> T:
    """`_broadcast` of something rank 0 always has (the others pass None)."""
    received = _broadcast(obj)
    if received is None:
        raise RuntimeError(f"{what} was not broadcast from rank 0")
    return received


def run(cfg: AnnotateConfig) -> AnnotateSummary | None:
    """Annotate `cfg.input` into `cfg.output`; returns the summary on global rank 0 (None elsewhere)."""
    cfg.validate()
    apm = open_apm_checkpoint(cfg.apm_checkpoint, "apm_checkpoint")
    data_parallel_size(cfg.parallel, runtime.launch_world_size())
    validate_model_layout(apm.config.model, cfg.parallel, runtime.detect_accelerator())
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        scorer = AttributeScorer.from_checkpoint(
            apm,
            layout,
            micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.seq_length,
            seed=cfg.seed,
            verify=cfg.verify_checkpoint,
        )
        judging = Judging.open(cfg.judge, scorer.schema, layout, cfg.verify_checkpoint)
        return _annotate(cfg, apm.path, scorer, judging)
    finally:
        runtime.shutdown()


def _annotate(
    cfg: AnnotateConfig, apm_path: Path, scorer: AttributeScorer, judging: Judging | None
) -> AnnotateSummary | None:
    output, layout, schema = Path(cfg.output), scorer.layout, scorer.schema
    judge = None if judging is None else judging.describe()  # digests the judge's checksums: once
    work = _Work(Path(f"{output}.parts"), _settings(cfg, apm_path, scorer, judge))
    stats, counts, lengths, judge_lengths = ReadStats(), Counter[str](), LengthStats(), LengthStats()
    rejects_path = Path(cfg.rejects or f"{output}.rejects.jsonl")
    reject = cfg.on_bad_row == BadRowPolicy.reject
    start = time.perf_counter()
    done: dict[int, dict] = {}
    if layout.is_rank_zero:
        work.root.mkdir(parents=True, exist_ok=True)
        done = work.done()
    sink = RejectSink(rejects_path) if reject and layout.is_rank_zero else None
    with sink or contextlib.nullcontext(), tqdm(desc="annotate", unit="row", disable=not layout.is_rank_zero) as bar:
        shards = _shards(cfg, schema, stats, sink) if layout.is_rank_zero else None
        for number in itertools.count():
            shard = next(shards, None) if shards is not None else None
            reuse = _broadcast(None if shard is None else work.reusable(number, shard, done))
            if reuse is None:
                break
            counts["shards"] += 1
            if reuse:
                counts["skipped"] += 1
                continue
            records = _broadcast_required(None if shard is None else shard.records, f"shard {number}")
            for record in records:
                check_rated_attributes(record, schema, "apm_checkpoint", cfg.apm_checkpoint)
            truncated_before, judge_truncated_before = lengths.truncated, judge_lengths.truncated
            examples = scorer.examples(records, partial(_needs, cfg.mode), lengths)
            scores = scorer.score_examples(examples)
            if judging is not None:
                labels_of = partial(_written_labels, schema=schema, mode=cfg.mode)
                positions = [example.turn for example in examples]
                scores = judging.rescore(records, positions, scores, labels_of, _rounded, judge_lengths)
            counts["rows"] += len(records)
            if shard is not None:  # rank 0
                rows = _annotated_rows(records, examples, scores, scorer.rewards(scores), schema, cfg.mode)
                entry = {
                    "input": shard.fingerprint,
                    "rows": len(rows),
                    "turns": len(examples),
                    "truncated": lengths.truncated - truncated_before,
                    "judge_truncated": judge_lengths.truncated - judge_truncated_before,
                }
                work.finish(number, rows, entry, done)
            bar.update(len(records))
            dist.barrier()
    if not layout.is_rank_zero:
        return None
    work.drop_after(counts["shards"], done)
    seconds = time.perf_counter() - start
    return _merge(cfg, work, done, layout, stats, counts, seconds, rejects_path if reject else None, schema, judge)


def _merge(
    cfg: AnnotateConfig,
    work: _Work,
    done: dict[int, dict],
    layout: runtime.ParallelLayout,
    stats: ReadStats,
    counts: Counter,
    seconds: float,
    rejects: Path | None,
    schema: AttributeSchema,
    judge: dict | None,
) -> AnnotateSummary:
    histograms: dict[str, Counter[str]] = {name: Counter() for name in schema.attributes}
    text = []
    for shard in range(counts["shards"]):
        part = work.part(shard).read_text(encoding="utf-8")
        text.append(part)
        for line in part.splitlines():
            for turn in json.loads(line)["conversations"]:
                if turn["label"] is not None:
                    for name, value in schema.parse(turn["label"]).items():
                        histograms[name]["missing" if value is None else f"{value:g}"] += 1
    entries = [done[shard] for shard in range(counts["shards"])]
    written = sum(entry["rows"] for entry in entries)
    if written != stats.rows_out:
        raise RuntimeError(
            f"{work.root}: the parts hold {written} rows, the input {stats.rows_out}; delete the directory and rerun"
        )
    atomic_write_text(Path(cfg.output), "".join(text))
    summary = AnnotateSummary(
        input=cfg.input,
        output=cfg.output,
        apm_checkpoint=cfg.apm_checkpoint,
        mode=cfg.mode.value,
        layout=layout.describe(),
        rows_in=stats.rows_in,
        rows_out=written,
        rejected=stats.rejected,
        reasons=dict(stats.reasons),
        rejects_file=str(rejects) if rejects else None,
        shards=counts["shards"],
        shards_skipped=counts["skipped"],
        annotated_turns=sum(entry["turns"] for entry in entries),
        truncated_inputs=sum(entry["truncated"] for entry in entries),
        seconds=seconds,
        rows_per_s=counts["rows"] / max(seconds, 1e-9),
        histograms={name: dict(sorted(c.items())) for name, c in histograms.items()},
        judge=None
        if judge is None
        else {**judge, "truncated_inputs": sum(entry.get("judge_truncated", 0) for entry in entries)},
    )
    atomic_write_text(Path(f"{cfg.output}.summary.json"), json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def format_annotate_summary(summary: AnnotateSummary) -> str:
    lines = [
        f"{summary.input} -> {summary.output} ({summary.mode}, APM {summary.apm_checkpoint}, {summary.layout})",
        f"rows in: {summary.rows_in}  rows out: {summary.rows_out}  rejected: {summary.rejected}"
        + (f" (reasons in {summary.rejects_file})" if summary.rejected else ""),
        f"annotated assistant turns: {summary.annotated_turns}  inputs cut to seq_length: "
        f"{summary.truncated_inputs}  shards: {summary.shards} ({summary.shards_skipped} already done)",
        f"{summary.rows_per_s:.1f} rows/s over {summary.seconds:.1f} s",
    ]
    if summary.judge is not None:
        judge = summary.judge
        lines.append(
            f"judged by Bayes' rule with {judge['checkpoint']['path']} (step {judge['checkpoint']['step']}): "
            f"{', '.join(judge['attributes'])}; inputs cut to its positions: {judge['truncated_inputs']}"
        )
        lines.extend(f"re-predicted: {LinearFit(**fit).describe()}" for fit in judge["fits"])
    for name, counts in summary.histograms.items():
        lines.append(f"  {name:>12}  " + "  ".join(f"{value}:{count}" for value, count in counts.items()))
    return "\n".join(lines)
