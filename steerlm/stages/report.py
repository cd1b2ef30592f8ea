"""Gather what the pipeline's stages wrote, measure what needs a model or the oracle, write the report.

Measured here: the base LM's knowledge of the world (for each fact, does the model complete "The coat of Zuvezen
is mostly ___" with the right value among the relation's values), the APM's labels of the annotated
conversations against the oracle's levels and, with `pipeline.judge`, annotation's labels (the Bayes judge's and
the refit's) of the held-out ratings. All are cached under the pipeline's output_dir, so a rerun reads them back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import load_weights, resolve_checkpoint, saved_config
from steerlm.config import ModelConfig, ParallelConfig, PrecisionConfig, compose, to_typed
from steerlm.config.annotate import AnnotateConfig
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.schema import TokenizerConfig
from steerlm.data.readers import DataFormat, read_records, read_rows
from steerlm.data.records import Role
from steerlm.data.sampler import held_out
from steerlm.data.synthetic.oracle import Oracle
from steerlm.data.synthetic.splits import SCHEMA
from steerlm.data.synthetic.world import FACT_TEMPLATES, RELATIONS, World
from steerlm.evaluation.apm_metrics import pearson
from steerlm.evaluation.report import ReportInputs, write_report
from steerlm.files import atomic_write_text
from steerlm.models.gpt import build_model_chunks
from steerlm.stages import annotate
from steerlm.stages.annotate import SCORES_FIELD
from steerlm.stages.pipeline import Paths, plan
from steerlm.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
PROBE_TIERS = (0, 2, 4)
HELD_OUT_RATED = "held_out_rated.jsonl"  # under eval/: the rated rows no labeller trained on
HELD_OUT_LABELS = "held_out_labels.jsonl"  # under eval/: what annotation writes for them


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


def labels_held_out(cfg: PipelineConfig, out: Paths, world: World) -> dict:
    """With `pipeline.judge`: the labels annotation writes for the judged and refit attributes of the rated rows
    neither the judge nor the APM trained on, against the human rating and the oracle's level.

    The rows are labelled by the annotate stage itself, in this process at one process, with the pipeline's
    annotate arguments (its own `stages.annotate` overrides included) but `mode=overwrite`: the APM labels every
    assistant turn, the judge judges its attributes given the APM's other labels and the refit re-predicts from
    what is written, exactly as for an unlabelled conversation. The human ratings of the other attributes are not
    shown to the judge: quality in this world is a function of helpfulness and correctness, so conditioning on a
    rated quality would tell the judge much of the answer (docs/pipeline_measurements.md, "The labels on
    the held-out ratings"). Annotation's resumable output (`eval/held_out_labels.jsonl`) is the cache: a rerun
    with the same rows, checkpoints and settings reads it back.

    Both the judge and the APM hold out a row when a hash of it falls under their `data.validation_fraction`, so
    the rows measured are those under the smaller fraction: with equal fractions (the pipeline's), the APM's
    held-out rows."""
    fraction = min(
        float(saved_config(resolve_checkpoint(path)).data.validation_fraction) for path in (out.judge, out.apm)
    )
    rated, rows_file, labels_file = out.data / "annotated.jsonl", out.eval / HELD_OUT_RATED, out.eval / HELD_OUT_LABELS
    rows = [
        row
        for row in read_rows(rated, DataFormat.helpsteer2, SCHEMA)
        if row.records and held_out(f"{rated}:{row.line}", fraction)
    ]
    out.eval.mkdir(parents=True, exist_ok=True)
    lines = [row.raw.decode("utf-8") if isinstance(row.raw, bytes) else json.dumps(row.raw) for row in rows]
    atomic_write_text(rows_file, "".join(f"{line}\n" for line in lines))
    step = next(step for step in plan(cfg) if step.name == "annotate")
    replaced = {"input", "output", "format", "mode", "parallel"}
    overrides = [arg for arg in step.args if arg.split("=", 1)[0].lstrip("+~") not in replaced]
    overrides += [f"input={rows_file}", f"output={labels_file}", "format=helpsteer2", "mode=overwrite"]
    overrides.append("parallel=single")  # in this process; the checkpoints load at any layout
    annotate.run(to_typed(compose("annotate", overrides), AnnotateConfig))

    oracle = Oracle(world)
    human = [row.records[-1].turns[-1].labels or {} for row in rows]
    labelled = list(read_records(labels_file, DataFormat.conversation, SCHEMA))
    if len(labelled) != len(human):
        raise RuntimeError(f"{labels_file}: {len(labelled)} rows labelled, {len(human)} held out; delete it and rerun")
    last = [conversation.turns[-1] for conversation in labelled]
    truth = [oracle.score(list(c.turns[:-1]), c.turns[-1].text) for c in labelled]
    measured = {}
    for name in (*cfg.pipeline.judge, *cfg.pipeline.judge_refit):
        rated_rows = [i for i, labels in enumerate(human) if labels.get(name) is not None]
        ratings = np.array([human[i][name] for i in rated_rows], dtype=float)
        scores = np.array([labelled[i].extra[SCORES_FIELD][-1][name] for i in rated_rows])
        written = np.array([(last[i].labels or {}).get(name) for i in rated_rows], dtype=float)
        measured[name] = {
            "pearson": pearson(scores, ratings),
            "pearson_oracle": pearson(scores, np.array([truth[i][name] for i in rated_rows])),
            "exact_match": float(np.mean(written == ratings)),
            "rows": len(rated_rows),
            "judged": name in cfg.pipeline.judge,
        }
    return measured


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
        labels_held_out=labels_held_out(cfg, out, world) if cfg.pipeline.judge else {},
    )
    summary = write_report(inputs, out.root, command)
    log.info("report: %s (%d of %d targets met)", out.root / "report.md", summary["met"], summary["total"])
    return summary
