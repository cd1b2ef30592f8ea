"""`recipes/convert.py`: a model between steerlm's checkpoint format and Hugging Face's, either way.

The input's format (`steerlm.config.convert.input_format`) picks the direction; each format that can be
read has one reader here. A `.nemo` archive converts like a Hugging Face directory: into a steerlm checkpoint
(`steerlm.stages.nemo_import`); `to=nemo` writes a steerlm checkpoint as one (`steerlm.stages.nemo_export`).
A steerlm checkpoint converts into steerlm's own format too: its weights alone,
without the optimizer state or the base a LoRA run's adapters need (`steerlm.stages.consolidate`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.validation import data_parallel_size
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.consolidate import consolidate
from steerlm.stages.hf_export import export_to_hf
from steerlm.stages.hf_import import import_to_steerlm
from steerlm.stages.nemo_export import export_to_nemo
from steerlm.stages.nemo_import import import_nemo, import_nemo_lora
from steerlm.stages.nemo_lora_export import export_nemo_lora
from steerlm.stages.peft_export import export_peft_adapter

log = logging.getLogger(__name__)


def import_from_nemo(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """A NeMo 1.x archive as a weights-only steerlm checkpoint under `cfg.output` (its tokenizer beside it); a NeMo
    LoRA archive on `cfg.base` as a checkpoint of its adapters alone on that base."""
    if cfg.base is not None:
        return import_nemo_lora(cfg.input, cfg.base, cfg.output, layout, tokenizer_path=cfg.tokenizer_path)
    return import_nemo(cfg.input, cfg.output, layout, tokenizer_path=cfg.tokenizer_path, dtype=cfg.dtype)


# (input format, output format) → the conversion; collective over the layout it is given.
CONVERSIONS: dict[tuple[ModelFormat, ModelFormat], Callable[[ConvertConfig, ParallelLayout], Path]] = {
    (ModelFormat.steerlm, ModelFormat.hf): export_to_hf,
    (ModelFormat.hf, ModelFormat.steerlm): import_to_steerlm,
    (ModelFormat.nemo, ModelFormat.steerlm): import_from_nemo,
    (ModelFormat.steerlm, ModelFormat.nemo): export_to_nemo,  # a NeMo 1.x archive NeMo and NeMo-Aligner restore
    (ModelFormat.steerlm, ModelFormat.peft): export_peft_adapter,  # a LoRA run's adapters
    (ModelFormat.steerlm, ModelFormat.nemo_lora): export_nemo_lora,  # a LoRA run's adapters, NeMo's PEFT archive
    (ModelFormat.steerlm, ModelFormat.steerlm): consolidate,  # the weights alone, self-contained
}


def through_steerlm(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """A conversion between two foreign formats (a `.nemo` archive to Hugging Face or PEFT, a Hugging Face directory
    to `.nemo`) in one command: into a temporary steerlm checkpoint of the weights alone beside the output
    (`.<output>.steerlm`, as large as the weights), then out of it; the temporary is removed either way. The import
    takes the input's options (`base`, `tokenizer_path`), the export the output's (`dtype`, `attributes`, …)."""
    output = Path(cfg.output).resolve()
    hop = output.parent / f".{output.name}.steerlm"
    if layout.is_rank_zero:
        shutil.rmtree(hop, ignore_errors=True)
    dist.barrier()
    imported = replace(cfg, output=str(hop), to=ModelFormat.steerlm, dtype=None, attributes={})
    exported = replace(cfg, input=str(hop), tokenizer_path=None, base=None)
    try:
        CONVERSIONS[(cfg.source, ModelFormat.steerlm)](imported, layout)
        log.info("converting %s on from the steerlm checkpoint %s", cfg.input, hop)
        return CONVERSIONS[(ModelFormat.steerlm, cfg.target)](exported, layout)
    finally:
        dist.barrier()
        if layout.is_rank_zero:
            shutil.rmtree(hop, ignore_errors=True)


def convert(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: the conversion `cfg` asks for, at `layout` (already initialised); returns the output path."""
    conversion = CONVERSIONS.get((cfg.source, cfg.target))
    hops = {(cfg.source, ModelFormat.steerlm), (ModelFormat.steerlm, cfg.target)}
    if conversion is None and cfg.source != cfg.target and hops <= set(CONVERSIONS):
        conversion = through_steerlm
    if conversion is None:
        raise ConfigError(
            "to",
            cfg.target.value,
            f"steerlm cannot convert {cfg.source.value} into {cfg.target.value}",
            "convert steerlm → hf, steerlm → nemo, steerlm → steerlm (the weights alone) or a LoRA run's adapters → "
            "peft / nemo_lora, hf / nemo → steerlm, or hf / nemo on to any of those",
        )
    with torch.no_grad():
        return conversion(cfg, layout)


def run(cfg: ConvertConfig) -> Path | None:
    """Validate, start the runtime at `cfg.parallel` (one model copy over all launched ranks), convert; the output
    path on rank 0 (None elsewhere)."""
    cfg.validate()
    world = runtime.launch_world_size()
    if data_parallel_size(cfg.parallel, world) != 1:
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"{world} processes would hold {world // (tp * pp)} copies of the model; a conversion reads one",
            f"launch exactly {tp * pp} process(es) (torchrun --nproc-per-node {tp * pp}) for TP={tp} x PP={pp}",
        )
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    layout = runtime.initialize(cfg.parallel, cfg.seed)
    try:
        output = convert(cfg, layout)
    finally:
        runtime.shutdown()
    return output if layout.is_rank_zero else None
