"""`recipes/convert.py to=nemo_lora`: a LoRA run's adapters alone as NeMo 1.x's PEFT archive.

What NeMo's PEFT training (`megatron_gpt_finetuning.py model.peft.peft_scheme=lora`) saves and what NeMo's
`megatron_gpt_generate.py model.peft.restore_from_path=` (and NVIDIA NIM's NeMo-format LoRA loading) read next to
the base `.nemo`: `model_config.yaml` (the base model's config, as `to=nemo` writes it, plus NeMo's `peft` section)
and the adapters in NeMo's legacy layout, one `model_weights.ckpt` per (TP, PP) rank with the stage's local layer
numbers (NeMo restores PEFT weights at the TP/PP they were saved at, and sets its run to the config's sizes). Each
adapted linear's A and B are NeMo's `linear_in` and `linear_out` under `adapter_layer.lora_<…>_adapter`, sliced
as NeMo's `ParallelLinearAdapter` holds them (`steerlm.models.nemo_weights.legacy_adapter_states`); `alpha` and
`adapter_dim` give the same update, alpha / rank · B A. The archive's layout is the export's (`parallel`), and it
carries the tokenizer as `to=nemo` writes it and the `steerlm:` record. steerlm imports it back on its base
(`input=x.nemo base=model.nemo`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from steerlm import runtime
from steerlm.checkpoint.sharded import read_meta
from steerlm.checkpoint.sources import WeightFormat
from steerlm.config.convert import ConvertConfig
from steerlm.config.lora import NEMO_LORA_TARGETS
from steerlm.config.validation import validate_model_layout
from steerlm.models.nemo_config import layers_per_stage
from steerlm.models.nemo_weights import legacy_adapter_states
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_source import ExportSource, read_export_source
from steerlm.stages.nemo_export import NEMO_SUFFIX, archive_config, check_nemo_export, finish_archive, start_archive
from steerlm.stages.peft_export import base_model, check_adapters_alone, gather_adapters

log = logging.getLogger(__name__)
# NeMo's `lora_tuning.target_modules` name of each linear steerlm adapts
_NEMO_TARGET = {targets[0]: name for name, targets in NEMO_LORA_TARGETS.items() if len(targets) == 1}


def _base(source: ExportSource) -> str | None:
    """The base the adapters were trained on, as NeMo's `restore_from_path` when it is a `.nemo` model NeMo can
    restore (the base the checkpoint names, else the run's `init_from`); None otherwise (NeMo is then told the base
    on its command line)."""
    named = read_meta(source.path).base
    if named is not None and named.get("format") == WeightFormat.nemo.value:
        return str(named["path"])
    base = base_model(source.saved)
    return base if base is not None and base.endswith(NEMO_SUFFIX) else None


def peft_section(source: ExportSource, lora: dict) -> dict:
    """NeMo's `peft` config section for these adapters (LoRA on every layer, no activation between A and B)."""
    return {
        "peft_scheme": "lora",
        "restore_from_path": _base(source),
        "lora_tuning": {
            "variant": "nemo",
            "target_modules": [_NEMO_TARGET[target] for target in lora["targets"]],
            "adapter_dim": lora["rank"],
            "alpha": lora["alpha"],
            "adapter_dropout": float((source.saved.get("lora") or {}).get("dropout", 0.0)),
            "column_init_method": "xavier",
            "row_init_method": "zero",
            "layer_selection": None,
            "weight_tying": False,
            "position_embedding_strategy": None,
        },
    }


def export_nemo_lora(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write NeMo's PEFT archive `cfg.output` of the LoRA adapters of the checkpoint `cfg.input`."""
    source = read_export_source(cfg.input, cfg.tokenizer_path)
    lora = check_adapters_alone(cfg, source, "nemo")
    validate_model_layout(source.model, cfg.parallel, runtime.detect_accelerator())
    check_nemo_export(cfg, source)
    output = Path(cfg.output).resolve()
    staging, tokenizer = start_archive(cfg, source, layout)
    adapters = gather_adapters(cfg, source, layout)
    if layout.is_rank_zero:
        assert tokenizer is not None
        config = archive_config(source, layout, tokenizer, cfg.dtype or source.dtype)
        config["peft"] = peft_section(source, lora)
        stages = layers_per_stage(config, str(output), layout.pp)
        gated = source.model.gated_mlp
        for file, state in legacy_adapter_states(adapters, layout.tp, stages, gated).items():
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, staging / file)
        finish_archive(staging, config, output)
        log.info(
            "exported the LoRA adapters of %s (step %d, rank %d, %d tensors) as NeMo's PEFT archive %s (TP=%d, PP=%d)",
            source.path,
            source.step,
            lora["rank"],
            len(adapters),
            output,
            layout.tp,
            layout.pp,
        )
    dist.barrier()
    return output
