"""Evaluate how well a SteerLM checkpoint follows requested attributes (see steerlm.evaluation.steerability).

config → the checkpoint's model at the requested TP layout → the first `num_prompts` conversations →
one sweep per attribute → `output` (JSON) and a table on stdout. Every rank generates the same batches in
lockstep (tensor parallelism); data parallelism would only repeat the work, so it is refused.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.config.steering import SteeringEvalConfig
from steerlm.data.attribute_lines import AttributeLines, trained_attribute_lines
from steerlm.data.attributes import Labels
from steerlm.data.collate import prompt_ids
from steerlm.data.readers import read_records
from steerlm.data.records import Conversation, Role
from steerlm.data.synthetic.oracle import Oracle
from steerlm.data.synthetic.world import World
from steerlm.evaluation.steerability import Generated, base_report, format_report, sweep_report, sweep_requests
from steerlm.files import atomic_write_text
from steerlm.inference.generate import SamplingParams
from steerlm.inference.loading import LoadedModel, check_inference_layout, load_generator, read_checkpoint_setup

log = logging.getLogger(__name__)


def generate_steered_pairs(
    loaded: LoadedModel,
    pairs: Sequence[tuple[Conversation, Labels]],
    params: Sequence[SamplingParams],
    batch_size: int,
) -> list[Generated]:
    """One response per (prompt, requested labels) pair with that row's sampling params, in order, generated
    `batch_size` at a time (collective under TP)."""
    out: list[Generated] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids = [prompt_ids(loaded.template, loaded.tokenizer, c.system, c.turns, labels) for c, labels in chunk]
        completions = loaded.generator.generate(ids, list(params[start : start + batch_size]))
        out.extend(
            Generated(c, labels, done.text.strip(), done.finish_reason.value)
            for (c, labels), done in zip(chunk, completions)
        )
    return out


def generate_steered(
    loaded: LoadedModel,
    prompts: Sequence[Conversation],
    requests: Sequence[Labels],
    params: SamplingParams,
    batch_size: int,
) -> list[Generated]:
    """One response per (prompt, requested labels) pair, every prompt with every request, in order."""
    pairs = [(c, labels) for c in prompts for labels in requests]
    return generate_steered_pairs(loaded, pairs, [params] * len(pairs), batch_size)


def trained_lines_report(
    lines: AttributeLines | None, base: Labels, sweep: Sequence[str], levels: Sequence[float]
) -> dict | None:
    """How many of the checkpoint's trained attribute lines carry each value this evaluation requests (None when
    its run recorded none); a value none carries is named in the log, since the figures at it measure
    extrapolation."""
    if lines is None:
        return None
    at_base = lines.of_request(base)
    for name, count in at_base.items():
        if count == 0:
            log.warning(
                "the base request's %s:%g is on none of the %d attribute lines the checkpoint trained on (its %s "
                "values there: %s): every figure below is measured at a request it never saw",
                name,
                base[name],
                lines.lines,
                name,
                lines.values(name),
            )
    return {
        "lines": lines.lines,
        "base": at_base,
        "swept": {name: {f"{level:g}": lines.count(name, level) for level in levels} for name in sweep},
    }


def run(cfg: SteeringEvalConfig) -> dict | None:
    """Writes `cfg.output`; returns the report on rank 0 (None elsewhere)."""
    cfg.validate()
    setup = read_checkpoint_setup(cfg.checkpoint, tokenizer_path=cfg.tokenizer_path)
    sweep, levels, base = cfg.resolve(setup.schema)
    check_inference_layout(cfg.parallel, [setup.model])
    prompts = list(itertools.islice(read_records(cfg.prompts, cfg.prompts_format, setup.schema), cfg.num_prompts))
    if not prompts or any(not c.turns or c.turns[-1].role != Role.user for c in prompts):
        raise ConfigError(
            "prompts",
            cfg.prompts,
            "needs conversations that end with a user turn",
            "pass prompts such as the synthetic world's eval_prompts.jsonl",
        )
    oracle = Oracle(World(**json.loads(Path(cfg.world).read_text()))) if cfg.world else None
    trained = trained_lines_report(trained_attribute_lines(setup.path), base, [] if cfg.only_base else sweep, levels)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        loaded = load_generator(
            cfg.checkpoint, layout, cfg.precision, cfg.tokenizer_path, cfg.seed, verify=cfg.verify_checkpoint
        )
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        base_generated = generate_steered(loaded, prompts, [base], params, cfg.batch_size)
        at_base = base_report(base_generated, oracle, cfg.samples)
        reports = {}
        for attribute in [] if cfg.only_base else sweep:
            generated = generate_steered(
                loaded, prompts, sweep_requests(base, attribute, levels), params, cfg.batch_size
            )
            reports[attribute] = sweep_report(generated, attribute, levels, oracle, cfg.samples)
            log.info("%s", format_report({attribute: reports[attribute]}))
        result = {
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "prompts": len(prompts),
            "levels": levels,
            "base": base,
            "trained_lines": trained,
            "oracle": oracle is not None,
            "at_base": at_base,
            "attributes": reports,
        }
        if layout.is_rank_zero:
            atomic_write_text(cfg.output, json.dumps(result, indent=2) + "\n")
            return result
        return None
    finally:
        runtime.shutdown()
