"""Stage 4: bootstrap — sample at the best attribute settings, relabel with the APM, fine-tune again.

The SteerLM paper's §3.4, per iteration i (`bootstrap.iterations`), under `<output_dir>/iter_<i>/`:

1. requests: the attribute combinations of stage 3's training data (`data.train_file`) whose quality
   attribute (`quality`, or `helpfulness` for HelpSteer2 schemas) is at its maximum, each paired with
   a prompt of that data (`bootstrap.num_prompts` pairs, drawn with the seed);
2. samples: `bootstrap.samples_per_prompt` responses per pair from the previous model (stage 3's first), sampled
   (temperature / top-k / top-p) with a seed per row, written in resumable part files (`samples.parts/`);
3. labelled.jsonl: every sample labelled with the APM's predictions — what the response *is*, not what was
   asked for; a sample that is empty (the model ended its turn at once) has nothing to label or learn from: it
   goes to `empty.jsonl` instead and is counted in `eval.json`;
4. sft/: the previous model fine-tuned on the labelled samples (and, with `bootstrap.mix_original`, stage 3's
   data) with the SFT recipe's settings; it is the next iteration's model.

Every step's output is complete or absent, so a rerun (after a kill) continues where the last stopped; the
fine-tuning resumes from its own checkpoints. `eval.json` reports per iteration how far the APM found the
samples from the requested values; `final` links to the last iteration's model.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from steerlm import runtime
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.jsonl import json_line
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.records import Conversation, Role, Turn, from_conversation_json, to_conversation_json
from steerlm.errors import ConfigError
from steerlm.files import atomic_write_text
from steerlm.inference.generate import SamplingParams
from steerlm.inference.judge import Judging
from steerlm.inference.loading import load_generator
from steerlm.inference.scoring import AttributeScorer
from steerlm.stages import sft
from steerlm.stages.evaluate_steering import generate_steered_pairs
from steerlm.stages.runner import EVAL_FILE
from steerlm.training.loop import prepare_output_dir

log = logging.getLogger(__name__)
FINAL_LINK = "final"  # <output_dir>/final → the last iteration's model, written when the run completes
EMPTY_FILE = "empty.jsonl"  # iter_<i>/empty.jsonl: the samples that were empty responses


@dataclass(frozen=True)
class Request:
    prompt: Conversation  # ends with the user turn to answer
    labels: Labels  # the attribute combination asked for


@dataclass(frozen=True)
class IterationResult:
    iteration: int
    model: str  # the model sampled from
    requests: int
    samples: int
    empty_samples: int  # responses that were only an end of turn: kept in empty.jsonl, not labelled or trained on
    requested_vs_apm_mae: dict[str, float]  # mean |APM label − requested| per attribute
    exact_match: dict[str, float]  # share of samples whose APM label equals the requested value
    fine_tuned: str
    final_validation_loss: float | None


def prompt_of(conversation: Conversation) -> Conversation | None:
    """The conversation up to (not including) its last assistant turn, or None without one."""
    last = max((i for i, t in enumerate(conversation.turns) if t.role == Role.assistant), default=None)
    if last is None or last == 0:
        return None
    return replace(conversation, turns=conversation.turns[:last])


def top_requests(cfg: BootstrapConfig, schema: AttributeSchema, iteration: int) -> list[Request]:
    """`num_prompts` (prompt, combination) pairs: the combinations are the labels of the training data's fully
    labelled assistant turns whose quality attribute is at its highest level in the data (the schema's maximum
    when any turn reaches it); both drawn with (seed, iteration)."""
    quality = cfg.quality_attribute()
    prompts: list[Conversation] = []
    labelled: list[Labels] = []
    for conversation in read_records(cfg.data.train_file, cfg.data.format, schema):
        prompt = prompt_of(conversation)
        if prompt is not None:
            prompts.append(prompt)
        labelled += [t.labels for t in conversation.turns if t.labels and all(v is not None for v in t.labels.values())]
    if not prompts or not labelled:
        raise ConfigError(
            "data.train_file",
            cfg.data.train_file,
            f"holds {len(prompts)} prompts and {len(labelled)} fully labelled assistant turns",
            "bootstrap from stage 3's labelled training data (e.g. annotate's output)",
        )
    best = max(level for labels in labelled if (level := labels[quality]) is not None)  # all are set
    combinations = [labels for labels in labelled if labels[quality] == best]
    if best < schema.max_value:
        log.warning(
            "no turn of %s has %s=%g; asking for the best present, %g",
            cfg.data.train_file,
            quality,
            schema.max_value,
            best,
        )
    log.info("iteration %d: %d combinations with %s=%g", iteration, len(combinations), quality, best)
    rng = random.Random(f"bootstrap:{cfg.trainer.seed}:{iteration}")
    return [Request(rng.choice(prompts), rng.choice(combinations)) for _ in range(cfg.bootstrap.num_prompts)]


def _part(directory: Path, index: int) -> Path:
    return directory / f"part_{index:05d}.jsonl"


def sample(cfg: BootstrapConfig, model: str, requests: list[Request], out: Path, iteration: int) -> Path:
    """Generate every request's samples into `out/samples.jsonl` (collective); parts already written are kept."""
    final = out / "samples.jsonl"
    if final.exists():
        return final
    options = cfg.bootstrap
    parts = out / "samples.parts"
    rows = [(r, s) for r in requests for s in range(options.samples_per_prompt)]
    chunks = [rows[i : i + options.chunk_rows] for i in range(0, len(rows), options.chunk_rows)]
    layout = runtime.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        loaded = load_generator(
            model, layout, cfg.precision, cfg.tokenizer.path, cfg.trainer.seed, verify=cfg.checkpoint.verify
        )
        if layout.is_rank_zero:
            parts.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        for index, chunk in enumerate(chunks):
            if index % layout.dp != layout.dp_rank or _part(parts, index).exists():
                continue
            params = [
                SamplingParams(
                    max_new_tokens=options.max_new_tokens,
                    temperature=options.temperature,
                    top_k=options.top_k,
                    top_p=options.top_p,
                    seed=hash_seed(cfg.trainer.seed, iteration, index * options.chunk_rows + offset),
                )
                for offset in range(len(chunk))
            ]
            pairs = [(request.prompt, request.labels) for request, _ in chunk]
            generated = generate_steered_pairs(loaded, pairs, params, options.batch_size)
            if layout.tp_rank == 0 and layout.pp_rank == 0:
                schema = cfg.attributes.schema()  # validated once, not per row
                lines = [
                    json_line(sample_row(request, text, schema, index, copy))
                    for (request, copy), text in zip(chunk, (g.text for g in generated))
                ]
                atomic_write_text(_part(parts, index), "".join(lines))
            log.info("iteration %d: samples part %d of %d written", iteration, index + 1, len(chunks))
        dist.barrier()
        if layout.is_rank_zero:
            atomic_write_text(final, "".join(_part(parts, i).read_text() for i in range(len(chunks))))
        dist.barrier()
    finally:
        runtime.shutdown()
    return final


def hash_seed(seed: int, iteration: int, row: int) -> int:
    """A sampling seed per (run seed, iteration, row): reruns and any DP size draw the same responses."""
    return (seed * 1_000_003 + iteration * 10_007 + row) % (2**31)


def sample_row(request: Request, text: str, schema: AttributeSchema, chunk: int, copy: int) -> dict:
    conversation = Conversation(request.prompt.system, (*request.prompt.turns, Turn(Role.assistant, text)))
    row = to_conversation_json(conversation, schema)
    row["requested"] = schema.format(request.labels)
    row["prompt_source"] = request.prompt.source
    return row


def label(cfg: BootstrapConfig, samples: Path, out: Path) -> tuple[Path, int, dict, dict]:
    """Every non-empty sample labelled with the APM's rounded predictions → `out/labelled.jsonl`, the empty ones
    → `out/empty.jsonl` (collective); returns the labelled file, the number of empty samples and the
    per-attribute mean |APM − requested| and exact-match share."""
    final = out / "labelled.jsonl"
    schema = cfg.attributes.schema()
    numbered_lines = enumerate(samples.read_text().splitlines(), 1)
    numbered = [(number, json.loads(line)) for number, line in numbered_lines if line.strip()]
    empty = [row for _, row in numbered if not row["conversations"][-1]["value"].strip()]
    kept = [(number, row) for number, row in numbered if row["conversations"][-1]["value"].strip()]
    rows = [row for _, row in kept]
    if not rows:
        raise ConfigError(
            "sft.init_from",
            cfg.sft.init_from,
            f"every one of the {len(empty)} samples in {samples} is an empty response",
            "bootstrap from a model that answers: train stage 3 longer (trainer.max_steps) and check it with "
            "recipes/chat.py",
        )
    conversations = [from_conversation_json(row, schema, str(samples), number) for number, row in kept]
    requested = np.array([schema.targets(schema.parse(row["requested"])) for row in rows])
    if final.exists():
        labelled = [json.loads(line) for line in final.read_text().splitlines() if line.strip()]
        labels = np.array([schema.targets(schema.parse(row["conversations"][-1]["label"])) for row in labelled])
        return final, len(empty), *_agreement(schema, labels, requested)
    layout = runtime.initialize(replace(cfg.parallel), cfg.trainer.seed)
    try:
        scorer = AttributeScorer.from_checkpoint(
            cfg.bootstrap.apm_checkpoint, layout, seed=cfg.trainer.seed, verify=cfg.checkpoint.verify
        )
        scores = scorer.score(conversations)
        predicted = [schema.clip_round(score) for score in scores]
        judging = Judging.open(cfg.bootstrap.judge, schema, layout, cfg.checkpoint.verify, "bootstrap.judge")
        if judging is not None:
            predicted = _judged(judging, conversations, scores, schema)
        if layout.is_rank_zero:
            if empty:
                log.warning(
                    "%d of %d samples are empty responses: written to %s, not labelled",
                    len(empty),
                    len(empty) + len(rows),
                    out / EMPTY_FILE,
                )
            atomic_write_text(out / EMPTY_FILE, "".join(json_line(row) for row in empty))
            lines = []
            for row, conversation, predicted_labels in zip(rows, conversations, predicted):
                turns = (*conversation.turns[:-1], replace(conversation.turns[-1], labels=predicted_labels))
                labelled_row = {**to_conversation_json(replace(conversation, turns=turns), schema)}
                labelled_row.update({k: row[k] for k in ("requested", "prompt_source")})
                lines.append(json_line(labelled_row))
            atomic_write_text(final, "".join(lines))
        dist.barrier()
    finally:
        runtime.shutdown()
    labels = np.array([schema.targets(labels) for labels in predicted])
    return final, len(empty), *_agreement(schema, labels, requested)


def _judged(
    judging: Judging, conversations: list[Conversation], scores: list[dict[str, float]], schema: AttributeSchema
) -> list[Labels]:
    """The APM's labels of each sample's response with the judged (and refit) attributes replaced (collective)."""
    table = np.array([[score[name] for name in schema.attributes] for score in scores], dtype=np.float64)
    positions = [(i, len(conversation.turns) - 1) for i, conversation in enumerate(conversations)]

    def labels_of(turn: Turn, values: list) -> Labels:
        return schema.clip_round(dict(zip(schema.attributes, values)))

    table = judging.rescore(conversations, positions, table, labels_of)
    return [labels_of(conversation.turns[-1], row) for conversation, row in zip(conversations, table.tolist())]


def _agreement(schema: AttributeSchema, labels: np.ndarray, requested: np.ndarray) -> tuple[dict, dict]:
    mae = {name: float(np.abs(labels[:, i] - requested[:, i]).mean()) for i, name in enumerate(schema.attributes)}
    exact = {name: float((labels[:, i] == requested[:, i]).mean()) for i, name in enumerate(schema.attributes)}
    return mae, exact


def training_file(cfg: BootstrapConfig, labelled: Path, out: Path) -> Path:
    """The fine-tuning data: the labelled samples, and stage 3's data with `mix_original` (conversation JSONL)."""
    if not cfg.bootstrap.mix_original:
        return labelled
    mixed = out / "train.jsonl"
    if not mixed.exists():
        schema = cfg.attributes.schema()
        original = [
            json_line(to_conversation_json(c, schema))
            for c in read_records(cfg.data.train_file, cfg.data.format, schema)
        ]
        atomic_write_text(mixed, "".join(original) + labelled.read_text())
    return mixed


def fine_tune(cfg: BootstrapConfig, model: str, train_file: Path, out: Path) -> sft.SFTResult | dict:
    """The previous model fine-tuned on `train_file` with the recipe's SFT settings (resumes its checkpoints)."""
    run_dir = out / "sft"
    done = run_dir / EVAL_FILE
    if done.exists():
        return json.loads(done.read_text())
    derived = sft.SFTConfig(
        **{name: getattr(cfg, name) for name in sft.SFTConfig.__dataclass_fields__ if name not in ("data", "sft")},
        data=replace(cfg.data, train_file=str(train_file), format=DataFormat.conversation),
        sft=replace(cfg.sft, init_from=model),
    )
    derived.output_dir = str(run_dir)
    return sft.run(derived)


def run(cfg: BootstrapConfig) -> dict:
    """Every iteration (see the module docstring); writes `<output_dir>/eval.json` and returns it."""
    cfg.validate(runtime.launch_world_size(), runtime.detect_accelerator())
    output_dir = prepare_output_dir(cfg.output_dir)
    schema = cfg.attributes.schema()
    model = cfg.sft.init_from
    assert model is not None  # validated
    iterations = []
    for iteration in range(1, cfg.bootstrap.iterations + 1):
        out = output_dir / f"iter_{iteration}"
        out.mkdir(exist_ok=True)
        requests = top_requests(cfg, schema, iteration)
        samples = sample(cfg, model, requests, out, iteration)
        labelled, empty, mae, exact = label(cfg, samples, out)
        result = fine_tune(cfg, model, training_file(cfg, labelled, out), out)
        final_loss = result["final_validation_loss"] if isinstance(result, dict) else result.final_validation_loss
        iterations.append(
            IterationResult(
                iteration=iteration,
                model=str(model),
                requests=len(requests),
                samples=len(requests) * cfg.bootstrap.samples_per_prompt,
                empty_samples=empty,
                requested_vs_apm_mae=mae,
                exact_match=exact,
                fine_tuned=str(out / "sft"),
                final_validation_loss=final_loss,
            )
        )
        log.info(
            "iteration %d: APM vs requested exact match %s",
            iteration,
            ", ".join(f"{k} {v:.2f}" for k, v in exact.items()),
        )
        model = str(out / "sft")
    summary = {"final_model": str(model), "iterations": [asdict(i) for i in iterations]}
    if int(os.environ.get("RANK", "0")) == 0:
        link = output_dir / FINAL_LINK
        link.unlink(missing_ok=True)
        link.symlink_to(Path(model).relative_to(output_dir))
        atomic_write_text(output_dir / EVAL_FILE, json.dumps(summary, indent=2) + "\n")
    return summary
