"""SteerLM 2.0's data: for each prompt x with attributes a, n responses sampled from the stage-3 model Q' and
the three log-probabilities the objective needs (docs/steerlm2.md).

Three passes, one model in memory at a time, each resumable shard by shard (part files named in a manifest,
written atomically; a rerun skips finished shards, and a change of checkpoint or setting starts a pass over):

1. `sample` — Q' (the `steerlm_checkpoint`) samples n responses per prompt (response i of prompt p with its
   own seed, so reruns and TP layouts draw the same), then log Q'(y|a,x) on the tokens training will see: the
   prompt with its attribute line as context, `{y}\\n<extra_id_1>` trained.
2. `plain` — the plain-SFT model (`plain_sft_checkpoint`): log P(y|x), the same response tokens after the same
   prompt without the attribute line.
3. `attributes` — the regression APM scores each (x, y); log P(a|x,y) bins its predictions through a Beta
   distribution per attribute (`steerlm.data.steerlm2.attributes_log_probability`).

The merged output is NeMo-Aligner's SteerLM 2.0 JSONL, written atomically. Generation runs one model replica,
split by tensor or pipeline parallelism; every rank works in lockstep and global rank 0 writes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.config.schema import APMType
from steerlm.config.steerlm2 import PrepareSteerLM2Config
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.collate import Example, length_buckets, pad_batch, prompt_ids
from steerlm.data.jsonl import json_line
from steerlm.data.readers import BadRowPolicy, ReadStats, RejectSink, read_records
from steerlm.data.records import Conversation, Role, Turn, to_conversation_json
from steerlm.data.steerlm2 import (
    SampledResponse,
    SteerLM2Row,
    attributes_log_probability,
    read_steerlm2_rows,
    response_example,
    to_steerlm2_json,
)
from steerlm.errors import DataError
from steerlm.files import atomic_write_text
from steerlm.inference.generate import FinishReason, SamplingParams
from steerlm.inference.loading import (
    CheckpointSetup,
    LoadedModel,
    check_inference_layout,
    load_generator,
    read_checkpoint_setup,
)
from steerlm.inference.scoring import APMCheckpoint, AttributeScorer, open_apm_checkpoint
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.annotate import SCORE_DECIMALS, _broadcast_required
from steerlm.training import SEQUENCE_LOG_PROB, predict

log = logging.getLogger(__name__)
PASSES = ("sample", "plain", "attributes")
SCORES_FIELD = "attribute_scores"  # each response's raw APM scores (schema order), kept in the rows


@dataclass(frozen=True)
class PrepareSummary:
    input: str
    output: str
    checkpoints: dict[str, str]  # resolved checkpoint directories
    layout: str
    prompts: int  # rows written
    prompts_with_an_empty_response: int  # left out (the rows' format refuses empty responses)
    responses_per_prompt: int
    rejected: int
    shards: int
    shards_skipped: dict[str, int]  # per pass: shards a previous run had finished
    responses_cut_at_max_new_tokens: int
    mean_effective_responses: float  # mean over prompts of 1 / sum_i w_i^2 (n when w is uniform, 1 when one-hot)
    seconds: float


@dataclass
class _Work:
    """One pass's parts directory: one JSONL per finished shard and a manifest naming what made them."""

    root: Path
    identity: dict

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def done(self) -> set[int]:
        if not self.manifest.exists():
            return set()
        saved = json.loads(self.manifest.read_text())
        if saved["identity"] != self.identity:
            raise ConfigError(
                "output",
                str(self.root),
                f"holds parts of another annotation ({saved['identity']})",
                "use another output path, or delete the .parts directory to start over",
            )
        return set(saved["done"])

    def part(self, shard: int) -> Path:
        return self.root / f"shard_{shard:06d}.jsonl"

    def finish(self, shard: int, rows: list[dict], done: set[int]) -> None:
        atomic_write_text(self.part(shard), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        done.add(shard)
        atomic_write_text(self.manifest, json.dumps({"identity": self.identity, "done": sorted(done)}) + "\n")


@dataclass(frozen=True)
class Prompt:
    """x (system and turns ending with the user's, without labels) and the requested attributes a."""

    system: str
    turns: tuple[Turn, ...]
    labels: Labels
    source: str


def _prompt_of(conversation: Conversation) -> Prompt:
    """The conversation's last turn must be a labelled assistant turn: its labels are a, the turns before it x."""
    last = conversation.turns[-1]
    if last.role != Role.assistant or last.labels is None or all(v is None for v in last.labels.values()):
        raise DataError(
            conversation.source or "<input>",
            None,
            "conversations",
            "does not end with a labelled assistant turn (its labels are the attributes a to sample for)",
            "give conversations whose last assistant turn carries labels, e.g. the SFT training data",
        )
    history = tuple(Turn(turn.role, turn.text) for turn in conversation.turns[:-1])
    return Prompt(conversation.system, history, dict(last.labels), conversation.source)


def read_prompts(cfg: PrepareSteerLM2Config, schema: AttributeSchema) -> tuple[list[Prompt], int]:
    """The first `max_prompts` usable prompts of the input (on the calling rank) and the count rejected."""
    stats, prompts = ReadStats(), list[Prompt]()
    reject = cfg.on_bad_row == BadRowPolicy.reject
    with RejectSink(cfg.rejects or f"{cfg.output}.rejects.jsonl") if reject else contextlib.nullcontext() as sink:
        for conversation in read_records(cfg.input, cfg.format, schema, cfg.on_bad_row, sink, stats):
            try:
                prompts.append(_prompt_of(conversation))
            except DataError as error:
                if sink is None:  # on_bad_row=error
                    raise
                sink.write(error, to_conversation_json(conversation, schema))
                stats.rejected += 1
            if cfg.max_prompts is not None and len(prompts) == cfg.max_prompts:
                break
    return prompts, stats.rejected


@torch.no_grad()
def response_log_probs(
    model: list, examples: list[Example], pad_id: int, layout: ParallelLayout, micro_batch_size: int
) -> list[float]:
    """Each example's log-probability of its trained tokens under `model` (eval mode for the call), in
    batches of similar length; identical on every rank of the (tensor-parallel) replica."""
    modes = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    out: dict[int, float] = {}
    try:
        for members in length_buckets([len(e.ids) for e in examples], micro_batch_size):
            batch = pad_batch([examples[i] for i in members], pad_id)
            values = predict(model, [batch], layout, SEQUENCE_LOG_PROB)[0]
            out.update(zip(members, values.double().cpu().tolist()))
    finally:
        for chunk, training in zip(model, modes):
            chunk.train(training)
    return [out[i] for i in range(len(examples))]


def _identities(cfg: PrepareSteerLM2Config, checkpoints: dict[str, str]) -> dict[str, dict]:
    """What each pass's parts depend on; each pass also depends on the ones before it."""
    sample = {
        "input": str(Path(cfg.input).resolve()),
        "format": cfg.format.value,
        "max_prompts": cfg.max_prompts,
        "shard_size": cfg.shard_size,
        "steerlm_checkpoint": checkpoints["steerlm_checkpoint"],
        "num_responses": cfg.num_responses,
        "sampling": [cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.seed],
    }
    plain = {**sample, "plain_sft_checkpoint": checkpoints["plain_sft_checkpoint"]}
    attributes = {
        **plain,
        "apm_checkpoint": checkpoints["apm_checkpoint"],
        "attribute_concentration": cfg.attribute_concentration,
    }
    return {"sample": sample, "plain": plain, "attributes": attributes}


def _seed(cfg: PrepareSteerLM2Config, prompt_index: int, response: int) -> int:
    """Response `response` of prompt `prompt_index` (in input order) is drawn with its own generator seed."""
    return (cfg.seed * 1_000_003 + prompt_index) * cfg.num_responses + response


def _sample(cfg: PrepareSteerLM2Config, model: LoadedModel, prompts: list[Prompt], first: int) -> list[SteerLM2Row]:
    """Pass 1 on one shard (prompts `first`, `first + 1`, …): n responses per prompt from Q' and their log Q'.

    A response that ended at Q''s end of turn has that turn's closing newline removed, so training's
    `{y}\\n<extra_id_1>` is the sampled text; one cut at `max_new_tokens` keeps `finish_reason: length`. A prompt
    with an empty response is left out (its summary counts it): the rows' format refuses empty responses.
    """
    pairs = [(p, i) for p in range(len(prompts)) for i in range(cfg.num_responses)]
    done = []
    for start in range(0, len(pairs), cfg.micro_batch_size):
        chunk = pairs[start : start + cfg.micro_batch_size]
        ids = [prompt_ids(model.template, model.tokenizer, *_context(prompts[p])) for p, _ in chunk]
        params = [
            SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, seed=_seed(cfg, first + p, i))
            for p, i in chunk
        ]
        done.extend(model.generator.generate(ids, params))
    suffix = model.template.config.turn_suffix
    texts = [c.text.removesuffix(suffix) if c.finish_reason == FinishReason.stop else c.text for c in done]
    examples = [
        response_example(model.template, model.tokenizer, *_context(prompts[p]), t) for (p, _), t in zip(pairs, texts)
    ]
    log_q = response_log_probs(
        [model.generator.model], examples, model.tokenizer.pad_id, model.generator.layout, cfg.micro_batch_size
    )
    rows = []
    for p, prompt in enumerate(prompts):
        picked = range(p * cfg.num_responses, (p + 1) * cfg.num_responses)
        if any(not texts[k].strip() for k in picked):
            continue
        responses = tuple(
            SampledResponse(texts[k], 0.0, 0.0, log_q[k], {"finish_reason": done[k].finish_reason.value})
            for k in picked
        )
        rows.append(SteerLM2Row(prompt.system, prompt.turns, prompt.labels, responses, prompt.source))
    return rows


def _context(prompt: Prompt | SteerLM2Row) -> tuple[str, tuple[Turn, ...], Labels | None]:
    """(system, prompt turns, labels): what a prompt's tokens are built from."""
    if isinstance(prompt, Prompt):
        return prompt.system, prompt.turns, prompt.labels
    return prompt.system, prompt.prompt_turns, prompt.labels


def _plain(cfg: PrepareSteerLM2Config, model: LoadedModel, rows: list[SteerLM2Row]) -> list[SteerLM2Row]:
    """Pass 2 on one shard: log P(y|x) of every response under the plain-SFT model (no attribute line)."""
    examples = [
        response_example(model.template, model.tokenizer, *_context(row), r.text) for row in rows for r in row.responses
    ]
    values = iter(
        response_log_probs(
            [model.generator.model], examples, model.tokenizer.pad_id, model.generator.layout, cfg.micro_batch_size
        )
    )
    return [
        replace(row, responses=tuple(replace(r, log_p_response=next(values)) for r in row.responses)) for row in rows
    ]


def _attributes(cfg: PrepareSteerLM2Config, scorer: AttributeScorer, rows: list[SteerLM2Row]) -> list[SteerLM2Row]:
    """Pass 3 on one shard: the APM's scores of every (x, y) and log P(a|x,y) from them."""
    conversations = [
        Conversation(row.system, (*row.prompt_turns, Turn(Role.assistant, r.text)), row.source)
        for row in rows
        for r in row.responses
    ]
    scores = iter(scorer.score(conversations))
    out = []
    for row in rows:
        responses = []
        for response in row.responses:
            scored = next(scores)
            values = [scored[name] for name in scorer.schema.attributes]
            if row.labels is None:
                raise DataError(row.source, None, "label", "has no requested attributes to score log P(a|x,y) against")
            log_p = attributes_log_probability(values, row.labels, scorer.schema, cfg.attribute_concentration)
            extra = {**response.extra, SCORES_FIELD: [round(v, SCORE_DECIMALS) for v in values]}
            responses.append(replace(response, log_p_attributes=log_p, extra=extra))
        out.append(replace(row, responses=tuple(responses)))
    return out


def _check_models(steerlm: CheckpointSetup, plain: CheckpointSetup, apm: APMCheckpoint) -> None:
    """Q' conditions on attributes, the plain-SFT model does not, and the APM rates Q''s attributes as levels."""
    if not steerlm.template.config.condition_on_attributes:
        raise ConfigError(
            "steerlm_checkpoint",
            str(steerlm.path),
            "was trained with sft.condition_on_attributes=false, so it cannot be asked for attributes",
            "pass the attribute-conditioned stage-3 run (recipes/train_sft.py)",
        )
    if plain.template.config.condition_on_attributes:
        raise ConfigError(
            "plain_sft_checkpoint",
            str(plain.path),
            "was trained with attribute lines; P(y|x) is the model that never saw them",
            "train one with recipes/train_sft.py sft.condition_on_attributes=false on the same data",
        )
    if apm.config.apm.type != APMType.regression:
        raise ConfigError(
            "apm_checkpoint",
            str(apm.path),
            f"is a {apm.config.apm.type.value} APM; P(a|x,y) bins a regression APM's predicted scores",
            "pass a regression APM (recipes/train_attribute_model.py apm.type=regression)",
        )
    ours, theirs = steerlm.schema, apm.schema
    if (ours.attributes, ours.min_value, ours.max_value) != (theirs.attributes, theirs.min_value, theirs.max_value):
        raise ConfigError(
            "apm_checkpoint",
            str(apm.path),
            f"rates {list(theirs.attributes)} on [{theirs.min_value:g}, {theirs.max_value:g}], the SteerLM model "
            f"is asked for {list(ours.attributes)} on [{ours.min_value:g}, {ours.max_value:g}]",
            "pass an APM trained on the SteerLM model's attribute schema",
        )
    if not ours.integer:
        raise ConfigError(
            "steerlm_checkpoint",
            str(steerlm.path),
            f"uses schema '{ours.name}' with real-valued attributes; P(a|x,y) needs integer levels to bin",
            "train the models on an integer schema (attributes.integer=true)",
        )


def run(cfg: PrepareSteerLM2Config) -> PrepareSummary | None:
    """Write `cfg.output` (and `<output>.summary.json`); returns the summary on global rank 0, None elsewhere."""
    cfg.validate()
    setups = {
        "steerlm_checkpoint": read_checkpoint_setup(cfg.steerlm_checkpoint, "steerlm_checkpoint"),
        "plain_sft_checkpoint": read_checkpoint_setup(cfg.plain_sft_checkpoint, "plain_sft_checkpoint"),
    }
    apm = open_apm_checkpoint(cfg.apm_checkpoint, "apm_checkpoint")
    _check_models(setups["steerlm_checkpoint"], setups["plain_sft_checkpoint"], apm)
    check_inference_layout(cfg.parallel, [setup.model for setup in setups.values()] + [apm.config.model])
    if (cfg.temperature, cfg.top_k, cfg.top_p) != (1.0, 0, 1.0):
        log.warning(
            "sampling with temperature=%g top_k=%d top_p=%g draws from a distribution other than Q'; the rows' "
            "log(Q(y|a,x)) is Q' itself, so the importance weights are approximate",
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
        )
    checkpoints = {key: str(setup.path.resolve()) for key, setup in setups.items()}
    checkpoints["apm_checkpoint"] = str(apm.path.resolve())
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        return _prepare(cfg, layout, checkpoints, setups["steerlm_checkpoint"].schema, apm)
    finally:
        runtime.shutdown()


def _prepare(
    cfg: PrepareSteerLM2Config,
    layout: ParallelLayout,
    checkpoints: dict[str, str],
    schema: AttributeSchema,
    apm: APMCheckpoint,
) -> PrepareSummary | None:
    began = time.perf_counter()
    identities = _identities(cfg, checkpoints)
    works = {name: _Work(Path(f"{cfg.output}.parts") / name, identities[name]) for name in PASSES}
    if layout.is_rank_zero:
        for work in works.values():
            work.root.mkdir(parents=True, exist_ok=True)
    done = {name: work.done() for name, work in works.items()}
    prompts, rejected = _broadcast_required(read_prompts(cfg, schema) if layout.is_rank_zero else None, "the prompts")
    shards = [prompts[i : i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    skipped = {name: len(done[name] & set(range(len(shards)))) for name in PASSES}

    def part(name: str, shard: int) -> list[SteerLM2Row]:
        path = works[name].part(shard)
        rows = list(read_steerlm2_rows(path, schema)) if layout.is_rank_zero else None
        return _broadcast_required(rows, f"{name} shard {shard}")

    def generator(key: str) -> Callable[[], LoadedModel]:
        location = getattr(cfg, key)
        return lambda: load_generator(
            location, layout, cfg.precision, seed=cfg.seed, key=key, verify=cfg.verify_checkpoint
        )

    passes: dict[str, tuple[Callable, Callable]] = {
        "sample": (
            generator("steerlm_checkpoint"),
            lambda model, s: _sample(cfg, model, shards[s], s * cfg.shard_size),
        ),
        "plain": (generator("plain_sft_checkpoint"), lambda model, s: _plain(cfg, model, part("sample", s))),
        "attributes": (
            lambda: AttributeScorer.from_checkpoint(
                apm, layout, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, verify=cfg.verify_checkpoint
            ),
            lambda scorer, s: _attributes(cfg, scorer, part("plain", s)),
        ),
    }
    for name, (load, process) in passes.items():
        todo = [s for s in range(len(shards)) if s not in done[name]]
        if not todo:
            continue
        model = load()
        for s in tqdm(todo, desc=name, unit="shard", disable=not layout.is_rank_zero):
            rows = process(model, s)
            if layout.is_rank_zero:
                works[name].finish(s, [to_steerlm2_json(row, schema) for row in rows], done[name])
            dist.barrier()
        del model
        gc.collect()
    if not layout.is_rank_zero:
        return None
    rows = [row for s in range(len(shards)) for row in read_steerlm2_rows(works["attributes"].part(s), schema)]
    atomic_write_text(cfg.output, "".join(json_line(to_steerlm2_json(row, schema)) for row in rows))
    summary = _summary(cfg, layout, checkpoints, rows, len(prompts), rejected, len(shards), skipped, began)
    atomic_write_text(f"{cfg.output}.summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    log.info("%d prompts x %d responses -> %s (%.0f s)", len(rows), cfg.num_responses, cfg.output, summary.seconds)
    return summary


def _summary(
    cfg: PrepareSteerLM2Config,
    layout: ParallelLayout,
    checkpoints: dict[str, str],
    rows: list[SteerLM2Row],
    prompts: int,
    rejected: int,
    shards: int,
    skipped: dict[str, int],
    began: float,
) -> PrepareSummary:
    effective = [1.0 / sum(w * w for w in row.target_weights()) for row in rows]
    return PrepareSummary(
        input=cfg.input,
        output=cfg.output,
        checkpoints=checkpoints,
        layout=layout.describe(),
        prompts=len(rows),
        prompts_with_an_empty_response=prompts - len(rows),
        responses_per_prompt=cfg.num_responses,
        rejected=rejected,
        shards=shards,
        shards_skipped=skipped,
        responses_cut_at_max_new_tokens=sum(
            r.extra.get("finish_reason") == FinishReason.length.value for row in rows for r in row.responses
        ),
        mean_effective_responses=sum(effective) / max(len(effective), 1),
        seconds=time.perf_counter() - began,
    )
