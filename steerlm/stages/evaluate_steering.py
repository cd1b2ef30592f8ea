"""Evaluate how well a SteerLM checkpoint follows requested attributes (see steerlm.evaluation.steerability).

config → the checkpoint's model at the requested TP layout → the first `num_prompts` conversations →
one sweep per attribute → `output` (JSON) and a table on stdout. Every rank generates the same batches in
lockstep (tensor parallelism); data parallelism would only repeat the work, so it is refused.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.config.steering import SteeringEvalConfig
from steerlm.data.readers import read_records
from steerlm.data.records import Role
from steerlm.data.synthetic.oracle import Oracle
from steerlm.data.synthetic.world import World
from steerlm.evaluation.steerability import format_report, sweep_report
from steerlm.inference.generate import SamplingParams
from steerlm.inference.loading import check_inference_layout, load_generator, read_checkpoint_setup

log = logging.getLogger(__name__)


def run(cfg: SteeringEvalConfig) -> dict | None:
    """Writes `cfg.output`; returns the report on rank 0 (None elsewhere)."""
    cfg.validate()
    setup = read_checkpoint_setup(cfg.checkpoint, tokenizer_path=cfg.tokenizer_path)
    sweep, levels, base = cfg.resolve(setup.schema)
    check_inference_layout(cfg.parallel, [setup.model])
    prompts = list(itertools.islice(read_records(cfg.prompts, cfg.prompts_format, setup.schema), cfg.num_prompts))
    if not prompts or any(not c.turns or c.turns[-1].role != Role.user for c in prompts):
        raise ConfigError("prompts", cfg.prompts, "needs conversations that end with a user turn",
                          "pass prompts such as the synthetic world's eval_prompts.jsonl")
    oracle = Oracle(World(**json.loads(Path(cfg.world).read_text()))) if cfg.world else None
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        loaded = load_generator(cfg.checkpoint, layout, cfg.precision, cfg.tokenizer_path, cfg.seed)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        reports = {}
        for attribute in sweep:
            reports[attribute] = sweep_report(loaded, prompts, attribute, levels, base, params, cfg.batch_size,
                                              oracle, cfg.samples)
            log.info("%s", format_report({attribute: reports[attribute]}))
        result = {"checkpoint": str(loaded.path), "step": loaded.step, "prompts": len(prompts), "levels": levels,
                  "base": base, "oracle": oracle is not None, "attributes": reports}
        if layout.is_rank_zero:
            output = Path(cfg.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")
            return result
        return None
    finally:
        runtime.shutdown()
