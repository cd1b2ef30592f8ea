"""`recipes/convert.py input=<run> to=steerlm`: a steerlm checkpoint as a self-contained, weights-only one.

A training checkpoint holds what resuming needs beside the weights: Adam's moments and, under bf16, the fp32 master
weights (12 bytes a parameter beside the bf16 weights' 2), and a LoRA run that saves its adapters alone holds only
those, over a base it names by path. To serve, share or archive a model one wants its weights alone, readable
without the base or the training directory. This reads the checkpoint as every reader does (its base first, its
adapters merged into the weights) and writes them as a weights-only checkpoint, in `dtype` (null: as trained), from
`parallel`'s layout, with the tokenizer copied beside it and the config naming that copy. Runs start from it with
`init_from`; chat, serve, annotate, evaluation and `to=hf` read it like any other checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, load_weights, save_checkpoint
from steerlm.config.convert import ConvertConfig
from steerlm.config.lora import LoraConfig
from steerlm.config.validation import validate_model_layout
from steerlm.data.attribute_lines import trained_attribute_lines, write_attribute_lines
from steerlm.models.attribute import build_checkpoint_model
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_source import read_export_source, saved_train_config
from steerlm.stages.hf_import import TOKENIZER_DIR, copy_tokenizer

log = logging.getLogger(__name__)


def consolidate(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write the weights of the checkpoint `cfg.input` as a weights-only checkpoint in `cfg.output`."""
    source = read_export_source(cfg.input, cfg.tokenizer_path)
    validate_model_layout(source.model, cfg.parallel, runtime.detect_accelerator())
    output = Path(cfg.output).resolve()
    config = saved_train_config(source.saved)
    changes: dict = {
        "output_dir": str(output),
        "precision": replace(config.precision, dtype=cfg.dtype or source.dtype),
        "lora": LoraConfig(),  # the adapters are merged into the weights
    }
    if source.tokenizer is not None and hasattr(config, "tokenizer"):
        changes["tokenizer"] = replace(source.tokenizer, path=str(output / TOKENIZER_DIR))
    config = replace(config, **changes)
    chunks = build_checkpoint_model(source.model, config.precision, layout, cfg.seed, source.num_attributes)
    load_weights(source.path, chunks, layout, source.model)
    if layout.is_rank_zero and source.tokenizer is not None:
        copy_tokenizer(Path(source.tokenizer.path), output / TOKENIZER_DIR)
    path = save_checkpoint(output, source.step, WeightsOnly(chunks), layout, config)
    lines = trained_attribute_lines(source.path)
    if layout.is_rank_zero and lines is not None:
        write_attribute_lines(output, lines)
    if layout.is_rank_zero:
        log.info(
            "wrote the weights of %s (step %d) as %s, %s", source.path, source.step, path, config.precision.dtype.value
        )
    return output
