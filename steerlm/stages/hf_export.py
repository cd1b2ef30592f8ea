"""A steerlm checkpoint → a Hugging Face directory that `transformers` loads unchanged (`recipes/convert.py`).

Collective over the export layout. The files are planned from the checkpoint's config alone
(`steerlm.checkpoint.safetensors_writer`); rank 0 writes everything but the weights first — tokenizer,
chat template, and the check that the template tokenises to steerlm's own prompt ids — so a refusal stops
every rank before any weight is read. Then every rank loads its shards of the checkpoint and writes the
tensors it holds, one full tensor at a time (gathered over tensor parallelism), and rank 0 finishes the
config files and moves the directory into place. What steerlm needs to convert the export back exactly
(the source config, the word vocabulary, an APM's unused vocabulary output layer) goes to `steerlm/`,
which no Hugging Face tool reads.

| checkpoint | exported as | chat template renders |
|---|---|---|
| SFT (steerable) | LlamaForCausalLM | the SteerLM prompt; `attributes` steers it |
| regression APM | LlamaForSequenceClassification (`score` = the head) | the attribute prompt |
| generative APM | LlamaForCausalLM | the attribute prompt (the model writes the string) |
| base LM | LlamaForCausalLM | (none) |

(Nemotron-, Qwen2- and Qwen3-shaped models as `Nemotron…` / `Qwen2…` / `Qwen3…` classes: `hf_architecture`.)
The sequence classifiers' `score` has no bias, so the regression head's bias is written to
config.json as `steerlm_score_bias`: steerlm's scores are `logits + steerlm_score_bias`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from steerlm import runtime
from steerlm.checkpoint.safetensors_writer import (
    SafetensorsPlan,
    TensorSpec,
    create_files,
    plan_safetensors,
    write_index,
    write_tensor,
)
from steerlm.checkpoint.sharded import load_weights
from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ConvertConfig
from steerlm.config.schema import DType
from steerlm.config.validation import validate_model_layout
from steerlm.data.attribute_lines import trained_attribute_lines, write_attribute_lines
from steerlm.files import atomic_write_text
from steerlm.models.attribute import build_checkpoint_model
from steerlm.models.gpt import torch_dtype
from steerlm.models.hf_llama import (
    HEAD_BIAS,
    PADDING_PREFIX,
    hf_config_dict,
    megatron_shapes,
    megatron_to_hf_tensors,
    vocab_padding,
)
from steerlm.models.sharding import TIED_EMBEDDING, gather_full, named_global_parameters
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_files import example_prompts, export_tokenizer_checked, model_card
from steerlm.stages.export_source import (
    EXPORT_DIR,
    EXPORT_FILE,
    EXPORT_FORMAT,
    EXTRA_WEIGHTS,
    GENERATION_CONFIG,
    SCORE_BIAS,
    SOURCE_CONFIG,
    ExportSource,
    ModelKind,
    read_export_source,
)
from steerlm.tokenizers import Tokenizer, WordTokenizer, load_tokenizer

log = logging.getLogger(__name__)


def hf_tensor_specs(source: ExportSource, dtype: torch.dtype) -> list[TensorSpec]:
    """Every exported tensor in file order (embedding, layers, final norm, lm_head/score), then the vocabulary
    padding rows steerlm sets aside (`padding/<name>`), from shapes alone."""
    specs, padding = [], []
    for name, shape in megatron_shapes(source.model, source.num_attributes).items():
        if name == HEAD_BIAS:
            continue
        meta = torch.empty(shape, device="meta")
        specs += [TensorSpec(hf, tuple(t.shape), dtype) for hf, t in megatron_to_hf_tensors(name, meta, source.model)]
        rows = vocab_padding(name, meta, source.model)
        if rows is not None:
            padding.append(TensorSpec(PADDING_PREFIX + name, tuple(rows.shape), dtype))
    return specs + padding


def _routes(
    source: ExportSource, directory: Path, specs: list[TensorSpec], max_bytes: int
) -> dict[str, tuple[Path, SafetensorsPlan]]:
    """Tensor name → (directory, plan). What no Hugging Face model reads goes to steerlm/extra.safetensors: the
    vocabulary padding rows and an untied APM's vocabulary output layer (scoring never reads it), so the
    top-level files hold exactly the tensors transformers and vLLM load."""
    aside = [
        spec
        for spec in specs
        if spec.name.startswith(PADDING_PREFIX)
        or (source.kind == ModelKind.regression_apm and spec.name == "lm_head.weight")
    ]
    main = plan_safetensors([spec for spec in specs if spec not in aside], max_bytes)
    routes = {name: (directory, main) for name in main.specs}
    if aside:
        extra = plan_safetensors(aside, max_file_bytes=sum(spec.nbytes for spec in aside))
        extra = SafetensorsPlan(tuple(replace(f, name=EXTRA_WEIGHTS) for f in extra.files), extra.specs)
        routes.update({spec.name: (directory / EXPORT_DIR, extra) for spec in aside})
    return routes


def agree(layout: ParallelLayout, error: ConfigError | None) -> None:
    """Rank 0's refusal (or None) reaches every rank, which all raise it: no rank waits on one that stopped."""
    holder: list[Any] = [error]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise holder[0]


def _write_weights(
    chunks: list, layout: ParallelLayout, source: ExportSource, routes: dict, dtype: torch.dtype
) -> dict[str, Any]:
    """Collective: each full tensor this rank's stage holds is gathered over TP and written by TP rank 0 of
    the first data-parallel replica. Returns what is not a tensor in the export (the APM head's bias)."""
    writes = layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0
    extras: dict[str, Any] = {}
    for name, param in named_global_parameters(chunks):
        if name == TIED_EMBEDDING and not layout.is_first_stage:
            continue  # the last stage's copy of a tied embedding
        full = gather_full(param.detach(), param, layout.pg_collection.tp)
        if not writes:
            continue
        if name == HEAD_BIAS:
            extras[SCORE_BIAS] = full.float().tolist()
            continue
        pieces = megatron_to_hf_tensors(name, full, source.model)
        rows = vocab_padding(name, full, source.model)
        for hf_name, tensor in pieces + ([] if rows is None else [(PADDING_PREFIX + name, rows)]):
            directory, plan = routes[hf_name]
            write_tensor(directory, plan, hf_name, tensor.to(dtype))
        del full  # before the next gather allocates its shards
    return extras


def _config_json(source: ExportSource, tokenizer: Tokenizer | None, dtype: DType, extras: dict) -> dict:
    config = {**hf_config_dict(source.model), "architectures": [source.architecture]}
    config["torch_dtype"] = {DType.fp32: "float32", DType.bf16: "bfloat16", DType.fp16: "float16"}[dtype]
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if source.kind == ModelKind.regression_apm:
        assert source.schema is not None
        names = source.schema.attributes
        config.update(
            num_labels=len(names),
            id2label={str(i): name for i, name in enumerate(names)},
            label2id={name: i for i, name in enumerate(names)},
            problem_type="regression",
            **{SCORE_BIAS: extras[SCORE_BIAS]},
        )
    return config


def stop_token_ids(source: ExportSource, tokenizer: Tokenizer) -> list[int]:
    """What steerlm's generator stops on: the template's end-of-turn token (a steerable model) and EOS."""
    stops = []
    if source.kind == ModelKind.steerable and source.template and source.template.config.end_of_turn:
        stops.append(tokenizer.token_to_id(source.template.config.end_of_turn))
    if tokenizer.eos_id is not None:
        stops.append(tokenizer.eos_id)
    return stops


def _prepare(cfg: ConvertConfig, source: ExportSource, partial: Path, routes: dict) -> Tokenizer | None:
    """Rank 0, before any weight: the directory, the sized safetensors files and the checked tokenizer."""
    shutil.rmtree(partial, ignore_errors=True)
    (partial / EXPORT_DIR).mkdir(parents=True)
    for directory, plan in {id(plan): (directory, plan) for directory, plan in routes.values()}.values():
        create_files(directory, plan)
    if source.tokenizer is None:
        log.info("%s has no tokenizer: the export holds the model only", source.path)
        return None
    tokenizer = load_tokenizer(source.tokenizer.type.value, source.tokenizer.path)
    if tokenizer.vocab_size > source.model.vocab_size:
        raise ConfigError(
            "tokenizer_path",
            source.tokenizer.path,
            f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary (model.vocab_size) "
            f"{source.model.vocab_size}",
            "pass the tokenizer the checkpoint was trained with",
        )
    export_tokenizer_checked(cfg, source, tokenizer, partial)
    if isinstance(tokenizer, WordTokenizer):
        tokenizer.save(partial / EXPORT_DIR)
    return tokenizer


def _finish(
    cfg: ConvertConfig, source: ExportSource, partial: Path, routes: dict, tokenizer: Tokenizer | None, extras: dict
) -> Path:
    """Rank 0, after every weight: index, config.json, generation_config.json, model card, steerlm/ files; then
    the directory moves into place (an interrupted export leaves only `.<output>.partial`)."""
    dtype = cfg.dtype or source.dtype
    for directory, plan in {id(plan): (directory, plan) for directory, plan in routes.values()}.values():
        if directory == partial:
            write_index(directory, plan)
    config = _config_json(source, tokenizer, dtype, extras)
    atomic_write_text(partial / "config.json", json.dumps(config, indent=2) + "\n")
    if source.kind != ModelKind.regression_apm and tokenizer is not None:
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_token_ids(source, tokenizer)}
        generation["pad_token_id"] = tokenizer.pad_id
        atomic_write_text(partial / GENERATION_CONFIG, json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(source.path / SOURCE_CONFIG, partial / EXPORT_DIR / SOURCE_CONFIG)
    export = {
        "format": EXPORT_FORMAT,
        "kind": source.kind.value,
        "step": source.step,
        "source": str(source.path),
        "tokenizer": None if source.tokenizer is None else source.tokenizer.type.value,
    }
    atomic_write_text(partial / EXPORT_DIR / EXPORT_FILE, json.dumps(export, indent=2) + "\n")
    examples = example_prompts(partial, source) if tokenizer is not None else []
    trained = trained_attribute_lines(source.path) if source.kind == ModelKind.steerable else None
    if trained is not None:
        write_attribute_lines(partial / EXPORT_DIR, trained)
    atomic_write_text(partial / "README.md", model_card(source, config, examples, trained))
    output = Path(cfg.output)
    if output.is_dir():
        output.rmdir()  # validated empty
    os.replace(partial, output)
    return output


def export_to_hf(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write the Hugging Face directory `cfg.output` from the checkpoint `cfg.input`."""
    source = read_export_source(cfg.input, cfg.tokenizer_path)
    validate_model_layout(source.model, cfg.parallel, runtime.detect_accelerator())
    dtype = torch_dtype(cfg.dtype or source.dtype)
    output = Path(cfg.output).resolve()
    partial = output.parent / f".{output.name}.partial"
    routes = _routes(source, partial, hf_tensor_specs(source, dtype), cfg.max_shard_bytes)
    tokenizer, error = None, None
    if layout.is_rank_zero:
        try:
            tokenizer = _prepare(cfg, source, partial, routes)
        except ConfigError as refused:
            shutil.rmtree(partial, ignore_errors=True)
            error = refused
    agree(layout, error)
    precision = PrecisionConfig(dtype=source.dtype)
    chunks = build_checkpoint_model(source.model, precision, layout, cfg.seed, source.num_attributes)
    load_weights(source.path, chunks, layout, source.model)
    extras = _write_weights(chunks, layout, source, routes, dtype)
    del chunks
    gathered: list[dict] = [{} for _ in range(layout.world_size)]
    dist.all_gather_object(gathered, extras)
    merged = {key: value for part in gathered for key, value in part.items()}
    if layout.is_rank_zero:
        _finish(cfg, source, partial, routes, tokenizer, merged)
        log.info("exported %s (step %d) to %s as %s", source.path, source.step, output, source.architecture)
    dist.barrier()
    return output
