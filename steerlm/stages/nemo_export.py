"""`recipes/convert.py to=nemo`: a steerlm checkpoint as a NeMo 1.x Megatron-GPT `.nemo` archive (`output=x.nemo`),
or as the directory NeMo extracts one to (any other `output`), which NeMo and NeMo-Aligner restore in place too.

What NeMo's `save_to` writes for a megatron-core GPT, and what NeMo (`megatron_gpt_eval.py gpt_model_file=`,
`restore_from_path`) and NeMo-Aligner 0.7 (`train_gpt_sft.py`, `serve_reward_model.py rm_model_file=`) restore:
an uncompressed tar of `./model_config.yaml`, `./model_weights/` — megatron's distributed checkpoint (torch_dist)
of the model's `sharded_state_dict` under NeMo's `model.` prefix, written by megatron-core itself, layers stacked
along a leading axis — and the tokenizer. steerlm's models are megatron-core GPTModels, so the tensors need no
mapping: the local layer spec already names its norms as Transformer Engine's fused ones
(`linear_qkv.layer_norm_weight`), which is what a checkpoint holds under either spec. Three things are added:

- the `_extra_state` entries a Transformer Engine model asks for on load (NeMo's default strictness fails on a
  missing one; which ones depends on the loader's TE version, so all of them: the four linears', core
  attention's and its fused kernel's, the final norm's), each holding None, which every TE version reads as
  "no fp8 metadata";
- a regression APM's head as NeMo-Aligner's `rm_head` (fp32, as `force_head_dtype` says), and its
  `output_layer` (the reward model always builds one; a tied APM's is the embedding);
- the tokenizer: a SentencePiece model as NeMo's `sentencepiece` artifact when the model was trained on
  NeMo-Aligner's ids (`template.tokenization=nemo`); otherwise the tokenizer as steerlm trained with it (its
  SteerLM markers added) as a Hugging Face directory inside the archive, `tokenizer.type: nemo:<dir>` — which
  steerlm reads in place but NeMo resolves only as a path, so NeMo loads it with
  `++model.tokenizer.type=<the extracted directory>` (docs/migrating_from_nemo_aligner.md).

The vocabulary keeps every row: `make_vocab_size_divisible_by` is chosen so NeMo's padding of the tokenizer at the
written TP size gives the model's rows (else `override_vocab_size` names them). Collective over the export
layout (`parallel`), which the archive records as its TP/PP sizes; rank 0 writes everything but the weights and
moves the archive into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from omegaconf import OmegaConf

from steerlm import runtime
from steerlm.checkpoint.sharded import load_weights, unwrap, write_sharded
from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ConvertConfig
from steerlm.config.schema import Activation, DType
from steerlm.config.sources import NEMO_CONFIG_FILE, STEERLM_SECTION
from steerlm.config.validation import validate_model_layout
from steerlm.data.template import Tokenization
from steerlm.models.attribute import HEAD, build_checkpoint_model
from steerlm.models.gpt import torch_dtype
from steerlm.models.hf_llama import hf_architecture
from steerlm.models.nemo_archive import ARTIFACT_PREFIX
from steerlm.models.nemo_config import RewardHead, nemo_model_config
from steerlm.runtime.layout import ParallelLayout
from steerlm.stages.export_source import ExportSource, ModelKind, read_export_source
from steerlm.stages.hf_export import agree
from steerlm.tokenizers import load_tokenizer
from steerlm.tokenizers.export import export_tokenizer

log = logging.getLogger(__name__)
PREFIX = "model."  # NeMo's MegatronGPTModel keeps megatron's GPTModel as `self.model`
WEIGHTS_DIR = "model_weights"
NEMO_SUFFIX = ".nemo"  # an output named so is the tar NeMo's save_to writes; any other, the directory it extracts to
SENTENCEPIECE_FILE = "tokenizer.model"
# Modules of a Transformer Engine layer with fp8 metadata (`_extra_state`) besides the four linears, which
# megatron's local linears already save: TE >= 1.8's DotProductAttention, TE 1.6-1.7's FusedAttention in it.
_ATTENTION_EXTRA_STATE = ("core_attention._extra_state", "core_attention.fused_attention._extra_state")
_QKV_EXTRA_STATE = "self_attention.linear_qkv._extra_state"
_FINAL_NORM = PREFIX + "decoder.final_layernorm."  # TE >= 1.13's RMSNorm has fp8 metadata too
_EMBEDDING, _OUTPUT = PREFIX + "embedding.word_embeddings.weight", PREFIX + "output_layer.weight"


def _extra_states(state: dict[str, Any]) -> dict[str, ShardedObject]:
    """The `_extra_state` objects a TE model may ask for that megatron's local layers do not save, at the offsets
    of the layer (or final norm) they belong to, each holding None."""
    added: dict[str, ShardedObject] = {}
    for item in state.values():
        if isinstance(item, ShardedObject) and item.key.endswith(_QKV_EXTRA_STATE):
            layers = item.key[: -len(_QKV_EXTRA_STATE)] + "self_attention."
            for name in _ATTENTION_EXTRA_STATE:
                added[f"{layers}{name}@{item.global_offset}"] = replace(item, key=layers + name, data=None)
        if isinstance(item, ShardedTensor) and item.key == _FINAL_NORM + "weight":
            key = _FINAL_NORM + "_extra_state"
            added[key] = ShardedObject(key, None, (1,), (0,), replica_id=item.replica_id)
    return added


def nemo_sharded_state(chunks: list, dtype: torch.dtype, reward: bool, tied: bool) -> dict[str, Any]:
    """Every chunk's sharded state under NeMo's names, its weights in `dtype` (one entry per chunk: interleaved
    stages share keys). `reward`: the attribute head as NeMo-Aligner's fp32 `rm_head` (`force_head_dtype`'s
    default), and an `output_layer` when tied."""
    state: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        sharded = dict(unwrap(chunk).sharded_state_dict(prefix=PREFIX))
        for name, item in list(sharded.items()):
            if isinstance(item, ShardedObject) and item.key.endswith("_extra_state"):
                sharded[name] = replace(item, data=None)  # TE reads None as "no fp8 metadata"
                continue
            if not isinstance(item, ShardedTensor):
                continue
            if item.key.startswith(f"{PREFIX}{HEAD}."):
                key, data = item.key.replace(f"{PREFIX}{HEAD}.", f"{PREFIX}rm_head."), item.data.detach().float()
            else:
                key, data = item.key, item.data.detach().to(dtype)
            sharded[name] = replace(item, key=key, data=data, dtype=data.dtype)
            if reward and tied and key == _EMBEDDING:
                sharded[_OUTPUT] = replace(sharded[name], key=_OUTPUT)
        sharded.update(_extra_states(sharded))
        state[f"chunk{index}"] = sharded
    return state


def _content_name(files: list[Path], suffix: str) -> str:
    """NeMo names artifacts `<32 hex>_<name>` (a random uuid); a digest of the content keeps exports reproducible."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return f"{digest.hexdigest()[:32]}_{suffix}"


def _nemo_tokenizer(source: ExportSource, staging: Path) -> tuple[dict, int]:
    """Rank 0: write the tokenizer into the archive's directory; model_config.yaml's `tokenizer` section and how
    many ids NeMo's tokenizer has (what NeMo pads the vocabulary from)."""
    assert source.tokenizer is not None
    directory = Path(source.tokenizer.path)
    nemo_ids = _tokenization(source) == Tokenization.nemo
    if nemo_ids and (directory / SENTENCEPIECE_FILE).is_file():
        import sentencepiece

        name = _content_name([directory / SENTENCEPIECE_FILE], SENTENCEPIECE_FILE)
        shutil.copyfile(directory / SENTENCEPIECE_FILE, staging / name)
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(staging / name)).get_piece_size()
        section: dict[str, Any] = {"library": "sentencepiece", "type": None, "model": ARTIFACT_PREFIX + name}
        section.update(vocab_file=None, merge_file=None, delimiter=None, sentencepiece_legacy=False)
        return section, pieces
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(source.tokenizer.type.value, source.tokenizer.path, markers=not nemo_ids)
    written = staging / ".tokenizer"
    written.mkdir()
    export_tokenizer(tokenizer, written, None, source.model.max_position_embeddings)
    name = _content_name([file for file in written.iterdir() if file.is_file()], "tokenizer")
    written.rename(staging / name)
    ids = len(AutoTokenizer.from_pretrained(str(staging / name), local_files_only=True))
    section = {"library": "huggingface", "type": ARTIFACT_PREFIX + name, "use_fast": True, "model": None}
    section.update(vocab_file=None, merge_file=None, delimiter=None)
    return section, ids


def _tokenization(source: ExportSource) -> Tokenization:
    """How the source's template became token ids in training (`template.tokenization`; steerlm's markers before
    the option existed)."""
    return Tokenization(source.saved.get("template", {}).get("tokenization", Tokenization.markers.value))


def _hf_class(source: ExportSource, family: str) -> str:
    """The HF class an export writes `source`'s model as (`family`'s where no HF family computes it)."""
    try:
        return hf_architecture(source.model).causal_lm
    except ValueError:
        return f"{family}ForCausalLM"


def check_nemo_export(cfg: ConvertConfig, source: ExportSource) -> None:
    """What every `.nemo` export needs: a model NeMo 1.x builds, a tokenizer (NeMo builds the vocabulary from it),
    and no chat-template defaults."""
    # what no NeMo 1.x model NeMo-Aligner restores has (steerlm's .nemo import refuses such a config too)
    for unexpressed, what, family in (
        (
            source.model.qk_layernorm,
            "normalises each query and key head (model.qk_layernorm, Qwen3's attention)",
            "Qwen3",
        ),
        (source.model.long_rope, "rotates with LongRoPE's per-channel factors (model.rope_short_factor …)", "Phi3"),
        (source.model.rope_yarn_factor is not None, "rotates with YaRN's scaling (model.rope_yarn_factor)", "Llama"),
        (source.model.sliding_window is not None, "attends to a sliding window (model.sliding_window)", "Mistral"),
        (
            source.model.activation == Activation.geglu or source.model.apply_embedding_scaling,
            "is a Gemma (GELU-gated MLP with GELU's tanh approximation, scaled input embeddings)",
            "Gemma",
        ),
    ):
        if unexpressed:
            raise ConfigError(
                "to",
                cfg.to.value if cfg.to is not None else None,
                f"{cfg.input} {what}, which no NeMo 1.x model NeMo-Aligner restores has",
                f"export it to Hugging Face with to=hf ({_hf_class(source, family)})",
            )
    if source.tokenizer is None:
        raise ConfigError(
            "tokenizer_path",
            None,
            f"{cfg.input} names no tokenizer, and a .nemo archive holds its model's tokenizer (NeMo builds the "
            "vocabulary from it)",
            "pass tokenizer_path=<the tokenizer directory the model was trained with>",
        )
    requested = {name: value for name, value in cfg.attributes.items() if value is not None}
    if requested:
        raise ConfigError(
            "attributes",
            requested,
            "are the defaults of the chat template a to=hf export writes; a .nemo archive has no chat template "
            "(NeMo-Aligner's clients send the attribute string themselves)",
            "leave attributes unset",
        )


def _reward_head(source: ExportSource) -> RewardHead | None:
    if source.kind != ModelKind.regression_apm:
        return None
    assert source.schema is not None
    weights = source.saved.apm.get("merge_weights")
    return RewardHead(len(source.schema.attributes), None if weights is None else [float(w) for w in weights])


def _tar(directory: Path, archive: Path) -> None:
    """An uncompressed tar of `directory`'s files named `./…`, as NeMo's save_to writes it (sorted, owner and
    times cleared, so the same model gives the same bytes)."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(archive, "w:") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname="./" + path.relative_to(directory).as_posix(), recursive=False, filter=clean)


def start_archive(
    cfg: ConvertConfig, source: ExportSource, layout: ParallelLayout
) -> tuple[Path, tuple[dict, int] | None]:
    """Collective: the staging directory beside `cfg.output` and, on rank 0, the tokenizer written into it (its
    config section and NeMo's id count); a refusal on rank 0 is raised on every rank, nothing left behind."""
    output = Path(cfg.output).resolve()
    staging = output.parent / f".{output.name}.partial"
    tokenizer: tuple[dict, int] | None = None
    error = None
    if layout.is_rank_zero:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            tokenizer = _nemo_tokenizer(source, staging)
        except ConfigError as refused:
            shutil.rmtree(staging, ignore_errors=True)
            error = refused
    agree(layout, error)
    return staging, tokenizer


def archive_config(
    source: ExportSource,
    layout: ParallelLayout,
    tokenizer: tuple[dict, int],
    dtype: DType,
    reward_head: RewardHead | None = None,
) -> dict:
    """`model_config.yaml` of the archive: NeMo's model config at the export's layout, with the tokenizer that
    `start_archive` wrote (its section and id count), and the `steerlm:` record."""
    section, ids = tokenizer
    config = nemo_model_config(
        source.model,
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        dtype=dtype.value,
        tokenizer=section,
        tokenizer_ids=ids,
        reward_head=reward_head,
    )
    config[STEERLM_SECTION] = _provenance(source)
    return config


def finish_archive(staging: Path, config: dict, output: Path) -> None:
    """Rank 0: write `model_config.yaml` and move the staged archive into place, as a `.nemo` tar or (any other
    name) the directory NeMo extracts one to, which it restores in place: no second copy of the weights."""
    (staging / NEMO_CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if output.is_dir():
        output.rmdir()  # validated empty
    if output.suffix == NEMO_SUFFIX:
        partial = output.parent / f".{output.name}.tar.partial"
        _tar(staging, partial)
        os.replace(partial, output)
        shutil.rmtree(staging)
    else:
        os.replace(staging, output)


def export_to_nemo(cfg: ConvertConfig, layout: ParallelLayout) -> Path:
    """Collective: write the `.nemo` archive `cfg.output` from the checkpoint `cfg.input`."""
    source = read_export_source(cfg.input, cfg.tokenizer_path)
    validate_model_layout(source.model, cfg.parallel, runtime.detect_accelerator())
    check_nemo_export(cfg, source)
    output = Path(cfg.output).resolve()
    staging, tokenizer = start_archive(cfg, source, layout)
    dtype = cfg.dtype or source.dtype
    head = _reward_head(source)
    chunks = build_checkpoint_model(
        source.model, PrecisionConfig(dtype=source.dtype), layout, cfg.seed, source.num_attributes
    )
    load_weights(source.path, chunks, layout, source.model)
    tied = source.model.share_embeddings_and_output_weights
    state = nemo_sharded_state(chunks, torch_dtype(dtype), head is not None, tied)
    if layout.is_rank_zero:
        (staging / WEIGHTS_DIR).mkdir()
    dist.barrier()
    write_sharded(state, staging / WEIGHTS_DIR)
    del chunks, state
    if layout.is_rank_zero:
        assert tokenizer is not None
        finish_archive(staging, archive_config(source, layout, tokenizer, dtype, head), output)
        log.info("exported %s (step %d, %s) to %s", source.path, source.step, source.kind.value, output)
    dist.barrier()
    return output


def _provenance(source: ExportSource) -> dict:
    """What NeMo does not record and steerlm reads back when it imports or serves the archive
    (`steerlm.inference.nemo_source.steerlm_record`): the source, its attribute schema and its tokenization."""
    attributes = OmegaConf.to_container(source.saved.attributes) if "attributes" in source.saved else None
    return {
        "source": str(source.path),
        "step": source.step,
        "kind": source.kind.value,
        "attributes": attributes,
        "tokenization": _tokenization(source).value,
    }
