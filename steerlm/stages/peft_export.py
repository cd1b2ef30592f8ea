"""`recipes/convert.py to=peft`: a LoRA run's adapters as a PEFT adapter directory.

The directory holds `adapter_config.json` and `adapter_model.safetensors` as PEFT's `save_pretrained` writes them
for an HF Llama (and, for a run with a tokenizer, the tokenizer with its steering chat template, as the `to=hf`
export writes it), so `PeftModel.from_pretrained(base, directory)`, vLLM (`--enable-lora --lora-modules
name=directory`) and TGI (`LORA_ADAPTERS`) serve it on the base model the run started from, next to other
adapters of the same base. A fused megatron layer is several HF projections: `linear_qkv`'s adapters become
q_proj/k_proj/v_proj's (one A shared, B's rows split by head), `linear_fc1`'s gate_proj/up_proj's
(`steerlm.models.hf_llama.megatron_lora_to_peft_tensors`) — or, where the base stores them fused (a Phi-3 started from
its HF directory, or a model exported as one), the fused `qkv_proj`'s (B's rows regrouped as [q; k; v]) and
`gate_up_proj`'s. Adapters of a run started from a Gemma3ForConditionalGeneration name its language model's layers
(`model.language_model.layers.N`), so PEFT attaches them to that multimodal base.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import save_file

from steerlm import runtime
from steerlm.checkpoint.sharded import load_adapters, read_meta
from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ConvertConfig
from steerlm.config.schema import HF_CONFIG_FILE
from steerlm.config.validation import validate_model_layout
from steerlm.files import atomic_write_text
from steerlm.models.gpt import build_model_chunks, torch_dtype
from steerlm.models.hf_llama import (
    HF_ARCHITECTURES,
    LAYERS,
    LLAMA,
    base_layers,
    lora_projections,
    megatron_lora_to_peft_tensors,
    read_hf_config,
)
from steerlm.models.lora import is_adapter
from steerlm.models.sharding import gather_full, named_global_parameters
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_files import export_tokenizer_checked
from steerlm.stages.export_source import ExportSource, ModelKind, read_export_source
from steerlm.stages.hf_export import agree
from steerlm.tokenizers import load_tokenizer

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def base_model(saved: DictConfig) -> str | None:
    """The weights the run started from (its stage's `init_from`), as PEFT's `base_model_name_or_path`."""
    for section in saved.values():
        if isinstance(section, DictConfig) and section.get("init_from"):
            return str(section.init_from)
    return None


def _hf_base(source: ExportSource) -> Path | None:
    """The HF directory the run started from (its `init_from`), None where it started from anything else."""
    base = base_model(source.saved)
    return Path(base) if base is not None and (Path(base) / HF_CONFIG_FILE).is_file() else None


def base_stores_fused(source: ExportSource) -> bool | None:
    """Whether the HF model the run started from (its `init_from`, where that is an HF directory) stores q/k/v and
    gate/up fused, as a Phi-3 does: PEFT's adapters must name the base's own projections. None where the run started
    from anything else (a steerlm checkpoint, a `.nemo`): the projections of the family the model is exported as."""
    base = _hf_base(source)
    if base is None:
        return None
    family = HF_ARCHITECTURES.get(read_hf_config(base).get("model_type", LLAMA.model_type))
    return None if family is None else family.fused


def adapter_config(source: ExportSource, lora: dict, fused: bool | None, layers: str = LAYERS) -> dict:
    """PEFT's LoraConfig of these adapters, as `adapter_config.json` holds it (`fused`: `base_stores_fused`;
    `layers`: `base_layers`). On a multimodal base the targets are a regular expression (PEFT matches it against the
    whole module path) naming the language model's projections: its vision tower has projections of the same names."""
    projections = lora_projections(source.model, fused)
    targets: list[str] | str = sorted(
        {projection for target in lora["targets"] for projection in projections[target][1]}
    )
    if layers != LAYERS:
        targets = rf"{re.escape(layers)}\.\d+\.(self_attn|mlp)\.({'|'.join(targets)})"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model(source.saved),
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": float((source.saved.get("lora") or {}).get("dropout", 0.0)),  # the run's (training only)
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }


def check_adapters_alone(cfg: ConvertConfig, source: ExportSource, whole: str) -> dict:
    """The run's LoRA settings (`lora` of its checkpoint metadata), or a ConfigError: a run without adapters, or a
    regression APM (its head trains in full: an adapter format has no place for it). `whole`: the `to=` that
    exports the whole model instead."""
    lora = read_meta(source.path).lora
    if lora is None:
        raise ConfigError(
            "input",
            cfg.input,
            "holds no LoRA adapters (its run trained every weight: lora.rank=0)",
            f"export the whole model with to={whole}",
        )
    if source.kind == ModelKind.regression_apm:
        raise ConfigError(
            "to",
            cfg.to.value if cfg.to else None,
            f"{cfg.input} is a regression APM, whose attribute head trained in full beside the adapters: a causal "
            "LM's adapter has no place for it",
            f"export the merged model with to={whole}",
        )
    return lora


def gather_adapters(cfg: ConvertConfig, source: ExportSource, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """Collective: the run's adapters as full tensors by global name, on CPU, in `cfg.dtype` (else the run's);
    rank 0 gets them all, the other ranks an empty dict."""
    chunks = build_model_chunks(source.model, PrecisionConfig(dtype=source.dtype), layout, cfg.seed)
    load_adapters(source.path, chunks, layout, source.model)  # the frozen weights are not needed
    local = {}
    for name, param in named_global_parameters(chunks):
        if is_adapter(name):
            full = gather_full(param.detach(), param, layout.pg_collection.tp)
            if layout.tp_rank == 0:
                local[name] = full.cpu()
    gathered: list[dict] = [{} for _ in range(layout.world_size)]
    dist.all_gather_object(gathered, local)
    if not layout.is_rank_zero:
        return {}
    dtype = torch_dtype(cfg.dtype or source.dtype)
    return {name: tensor.to(dtype) for part in gathered for name, tensor in part.items()}


def _prepare(cfg: ConvertConfig, source: ExportSource, partial: Path) -> None:
    """Rank 0, before any weight: the directory and, for a run with a tokenizer, the tokenizer with its steering
    chat template (checked as the `to=hf` export checks it), so a refusal comes before the work."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if source.tokenizer is not None:
        tokenizer = load_tokenizer(source.tokenizer.type.value, source.tokenizer.path)
        export_tokenizer_checked(cfg, source, tokenizer, partial)


def export_peft_adapter(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write the PEFT adapter directory `cfg.output` from the LoRA checkpoint `cfg.input`."""
    source = read_export_source(cfg.input, cfg.tokenizer_path)
    lora = check_adapters_alone(cfg, source, "hf")
    validate_model_layout(source.model, cfg.parallel, runtime.detect_accelerator())
    output = Path(cfg.output).resolve()
    partial = output.parent / f".{output.name}.partial"
    error = None
    if layout.is_rank_zero:
        try:
            _prepare(cfg, source, partial)
        except ConfigError as refused:
            shutil.rmtree(partial, ignore_errors=True)
            error = refused
    agree(layout, error)
    adapters = gather_adapters(cfg, source, layout)
    if layout.is_rank_zero:
        fused, base = base_stores_fused(source), _hf_base(source)
        layers = LAYERS if base is None else base_layers(base)  # a multimodal Gemma 3's sit in its language model
        tensors = {
            peft_name: part.clone().contiguous()  # q, k, v (gate, up) share A: a copy each
            for name in sorted(adapters)
            for peft_name, part in megatron_lora_to_peft_tensors(name, adapters[name], source.model, fused, layers)
        }
        save_file(tensors, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = adapter_config(source, lora, fused, layers)
        atomic_write_text(partial / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        if output.is_dir():
            output.rmdir()  # validated empty
        os.replace(partial, output)
        log.info(
            "exported the LoRA adapters of %s (step %d, rank %d, %d tensors) to %s",
            source.path,
            source.step,
            lora["rank"],
            len(tensors),
            output,
        )
    dist.barrier()
    return output
