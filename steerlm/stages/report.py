"""Gather what the pipeline's stages wrote, measure what needs a model or the oracle, write the report.

Measured here: the base LM's knowledge of the world (for each fact, does the model complete "The coat of Zuvezen
is mostly ___" with the right value among the relation's values), the APM's labels of the annotated
conversations against the oracle's levels and, with `pipeline.judge`, the Bayes judge on the held-out ratings.
All are cached under the pipeline's output_dir, so a rerun reads them back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import load_weights, resolve_checkpoint, saved_config
from steerlm.config import ModelConfig, ParallelConfig, PrecisionConfig, to_typed
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.schema import TokenizerConfig
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.records import Role
from steerlm.data.sampler import held_out
from steerlm.data.synthetic.oracle import Oracle
from steerlm.data.synthetic.splits import SCHEMA
from steerlm.data.synthetic.world import FACT_TEMPLATES, RELATIONS, World
from steerlm.evaluation.apm_metrics import pearson
from steerlm.evaluation.report import ReportInputs, write_report
from steerlm.files import atomic_write_text
from steerlm.inference.judge import BayesJudge, JudgedTurn
from steerlm.models.gpt import build_model_chunks
from steerlm.stages.pipeline import Paths
from steerlm.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
PROBE_TIERS = (0, 2, 4)


def _load_world(path: Path) -> World:
    return World(**json.loads(path.read_text()))


@torch.no_grad()
def fact_recall(model: torch.nn.Module, tokenizer: Tokenizer, world: World, tier: int) -> float:
    """Share of the world's facts whose value the LM ranks first among the relation's values after the tier's
    wording up to the value ("The coat of Zuvezen is mostly"); chance is 1/8."""
    right = total = 0
    for entity, facts in world.facts.items():
        for relation, value in facts.items():
            prefix = FACT_TEMPLATES[relation][tier].split("{v}")[0].format(e=entity)
            ids = tokenizer.encode(prefix.rstrip())
            if tokenizer.bos_id is not None:
                ids = [tokenizer.bos_id, *ids]
            candidates = RELATIONS[relation]
            # each value's first token where it follows the prefix (word tokenizers attach the space)
            value_ids = [tokenizer.encode(prefix + c)[len(ids) - (tokenizer.bos_id is not None)] for c in candidates]
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1]
            right += candidates[int(torch.argmax(logits[value_ids]))] == value
            total += 1
    return right / total


def base_knowledge(base: Path, world: World, cache: Path) -> dict[str, float]:
    """Fact recall of the base LM per wording tier (one process, TP=1), cached in `cache`."""
    if cache.exists():
        return json.loads(cache.read_text())
    path = resolve_checkpoint(base)
    saved = saved_config(path)
    model_cfg = to_typed(saved.model, ModelConfig)
    tokenizer_cfg = to_typed(saved.tokenizer, TokenizerConfig)
    tokenizer = load_tokenizer(tokenizer_cfg.type.value, tokenizer_cfg.path)
    layout = runtime.initialize(ParallelConfig(), 0)
    try:
        chunks = build_model_chunks(model_cfg, PrecisionConfig(), layout, 0)
        load_weights(path, chunks, layout, model_cfg)
        model = chunks[0].eval()
        with runtime.inference():
            recall = {str(tier): fact_recall(model, tokenizer, world, tier) for tier in PROBE_TIERS}
    finally:
        runtime.shutdown()
    atomic_write_text(cache, json.dumps(recall, indent=2) + "\n")
    return recall


def apm_against_oracle(labels_file: Path, world: World, cache: Path) -> tuple[dict, dict]:
    """Per attribute: the 5x5 counts of (APM label, oracle level) over the annotated conversations' last
    responses, and the Pearson correlation of the APM's raw score with the oracle level; cached."""
    if cache.exists():
        cached = json.loads(cache.read_text())
        return cached["counts"], cached["pearson"]
    oracle = Oracle(world)
    names = SCHEMA.attributes
    counts = {name: np.zeros((5, 5), dtype=int) for name in names}
    raw: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for conversation in read_records(labels_file, DataFormat.conversation, SCHEMA):
        last = max(i for i, t in enumerate(conversation.turns) if t.role == Role.assistant)
        turn = conversation.turns[last]
        truth = oracle.score(list(conversation.turns[:last]), turn.text)
        scores = conversation.extra.get("attribute_scores")
        for name in names:
            label = None if turn.labels is None else turn.labels.get(name)
            if label is not None:
                counts[name][int(label), int(truth[name])] += 1
            if scores and scores[last] is not None and scores[last].get(name) is not None:
                raw[name].append((scores[last][name], truth[name]))
    correlation = {
        name: pearson(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else float("nan")
        for name, pairs in raw.items()
    }
    table = {name: counts[name].tolist() for name in names}
    atomic_write_text(cache, json.dumps({"counts": table, "pearson": correlation}, indent=2) + "\n")
    return table, correlation


def judge_held_out(
    judge_dir: Path, rated: Path, world: World, attributes: list[str], cache: Path, apm_fraction: float
) -> dict:
    """The Bayes judge's posterior means on the rated rows neither it nor the APM was trained on, per judged
    attribute against the human rating and the oracle's level; cached with the checkpoint (its step directory),
    the attributes and the hold-out, so another judge is measured again.

    Both hold out a row when a hash of it falls under their `data.validation_fraction`, so the rows held out by
    both are those under the smaller fraction: with equal fractions (the pipeline's), the APM's held-out rows."""
    path = resolve_checkpoint(judge_dir)
    fraction = min(float(saved_config(path).data.validation_fraction), apm_fraction)
    key = {"checkpoint": str(path), "attributes": attributes, "validation_fraction": fraction}
    if cache.exists() and (cached := json.loads(cache.read_text()))["key"] == key:
        return cached["judged"]
    rows = [row for row in read_records(rated, DataFormat.helpsteer2, SCHEMA) if held_out(row.source, fraction)]
    turns = []
    for row in rows:
        *context, last = row.turns
        given = {name: value for name, value in (last.labels or {}).items() if value is not None}
        turns.append(JudgedTurn(row.system, tuple(context), last.text, given))
    layout = runtime.initialize(ParallelConfig(), 0)
    try:
        # not under runtime.inference(): the judge scores through megatron's schedule, which needs the CPU stand-ins
        judge = BayesJudge.from_checkpoint(str(path), layout, attributes, SCHEMA)
        posteriors = judge.posteriors(turns)
    finally:
        runtime.shutdown()
    oracle, levels = Oracle(world), np.array(judge.levels)
    true_levels = [oracle.score(turn.context, turn.response) for turn in turns]
    judged = {}
    for j, name in enumerate(attributes):
        rated_rows = [i for i, turn in enumerate(turns) if name in turn.labels]
        means = posteriors[rated_rows, j] @ levels
        human = np.array([turns[i].labels[name] for i in rated_rows], dtype=float)
        truth = np.array([true_levels[i][name] for i in rated_rows])
        judged[name] = {
            "pearson": pearson(means, human),
            "pearson_oracle": pearson(means, truth),
            "exact_match": float(np.mean(levels[posteriors[rated_rows, j].argmax(axis=1)] == human)),
            "rows": len(rated_rows),
        }
    atomic_write_text(cache, json.dumps({"key": key, "judged": judged}, indent=2) + "\n")
    return judged


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) of a run's metrics.jsonl: training rows and validation rows."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "validation": []}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return curves
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row:
            curves["train"].append((row["step"], row["loss"]))
        if "val_loss" in row:
            curves["validation"].append((row["step"], row["val_loss"]))
    return curves


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def report(cfg: PipelineConfig, command: str = "python recipes/pipeline.py") -> dict:
    """Gather, measure and write `<output_dir>/report.md` (see steerlm.evaluation.report)."""
    out = Paths(Path(cfg.output_dir).resolve())
    world = _load_world(out.data / "world.json")
    counts, correlation = apm_against_oracle(out.data / "apm_labels.jsonl", world, out.eval / "apm_vs_oracle.json")
    boot = _json(out.bootstrap / "eval.json")
    curves = {
        name: loss_curves(path)
        for name, path in (("base", out.base), ("apm", out.apm), ("sft", out.sft), ("sft_plain", out.sft_plain))
    }
    for entry in boot["iterations"]:
        curves[f"bootstrap {entry['iteration']}"] = loss_curves(Path(entry["fine_tuned"]))
    inputs = ReportInputs(
        world=_json(out.data / "summary.json"),
        fact_recall=base_knowledge(out.base, world, out.eval / "fact_recall.json"),
        base=_json(out.base / "summary.json"),
        apm=_json(out.apm / "eval.json"),
        apm_vs_oracle=counts,
        apm_vs_oracle_pearson=correlation,
        annotate=_json(out.data / "apm_labels.jsonl.summary.json"),
        steering={model: _json(out.eval / f"steering_{model}.json") for model in ("sft", "bootstrap", "plain")},
        bootstrap=boot,
        curves=curves,
        targets={k: float(v) for k, v in vars(cfg.targets).items()},
        sft=_json(out.sft / "eval.json"),
        sft_plain=_json(out.sft_plain / "eval.json"),
        judge_held_out=judge_held_out(
            out.judge,
            out.data / "annotated.jsonl",
            world,
            list(cfg.pipeline.judge),
            out.eval / "judge_held_out.json",
            apm_fraction=float(saved_config(resolve_checkpoint(out.apm)).data.validation_fraction),
        )
        if cfg.pipeline.judge
        else {},
    )
    summary = write_report(inputs, out.root, command)
    log.info("report: %s (%d of %d targets met)", out.root / "report.md", summary["met"], summary["total"])
    return summary
