"""The weights of a `.nemo` archive by steerlm global name, from either of NeMo's layouts, at any source TP/PP.

- Distributed checkpoint (`model_weights/`, megatron dist_checkpointing with the `torch_dist` backend): every
  tensor is stored at its full (global) shape and the decoder layers are stacked along a leading axis
  (`model.decoder.layers.self_attention.linear_qkv.weight` is `[num_layers, …]`); read with
  torch.distributed.checkpoint, without a process group, whatever layout wrote it.
- Legacy (`model_weights.ckpt` per rank: at the root for one rank, `mp_rank_XX/` under tensor parallelism,
  `tp_rank_XX_pp_rank_YYY/` under pipeline parallelism): each file is one rank's state dict with its stage's
  local layer numbers. Tensor-parallel slices are concatenated along megatron's partition dim (SwiGLU fc1's
  `[gate_r; up_r]` slices back to `[gate; up]`; fused QKV slices hold whole query groups, so they concatenate),
  and layer numbers are shifted by the stage's offset.

Keys are megatron-core GPTModel's under NeMo's `model.` prefix (`model.module.` under megatron_amp_O2), with
Transformer Engine's fused norms (`linear_qkv.layer_norm_weight`) or the local spec's (`input_layernorm.weight`),
plus NeMo-Aligner's `rm_head` for a reward model; `_extra_state` entries (TE's fp8 metadata) carry no weights.
A key outside that set, or a tensor the model needs that the archive lacks, is refused naming it.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from steerlm.config.schema import ModelConfig, Normalization, PositionEmbedding
from steerlm.errors import DataError
from steerlm.megatron_compat import unfused_norm_name
from steerlm.models import lora
from steerlm.models.nemo_archive import NemoArchive
from steerlm.models.nemo_config import NemoModel, layers_per_stage, nemo_model
from steerlm.models.sharding import (
    TIED_EMBEDDING,
    load_full_parameters,
    named_global_parameters,
    shard_along,
    unshard_along,
)

DIST_DIR = "model_weights"
LEGACY_FILE = "model_weights.ckpt"
_LEGACY_RANK = re.compile(r"^(?:mp_rank_(\d+)(?:_(\d+))?|tp_rank_(\d+)_pp_rank_(\d+))/model_weights\.ckpt$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXTRA_STATE = "_extra_state"
_TOP_LEVEL = {
    TIED_EMBEDDING,
    "embedding.position_embeddings.weight",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias",
    "output_layer.weight",
}
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_LAYER_TENSORS = {
    *(f"{norm}.{p}" for norm in ("input_layernorm", "pre_mlp_layernorm") for p in ("weight", "bias")),
    *(
        f"{fused}.layer_norm_{p}"
        for fused in ("self_attention.linear_qkv", "mlp.linear_fc1")
        for p in ("weight", "bias")
    ),
    *(f"{linear}.{p}" for linear in _LINEARS for p in ("weight", "bias")),
}
_HEAD = {"rm_head.weight": "attribute_head.weight", "rm_head.bias": "attribute_head.bias"}
# NeMo's LoRA adapters (a PEFT archive, `megatron_gpt_peft_lora_tuning`): `linear_in` is A, `linear_out` B, by the
# layer's linear they adapt (NeMo's merge_lora_weights script pairs them the same way)
_ADAPTERS = {
    "lora_kqv_adapter": "self_attention.linear_qkv",
    "lora_dense_attention_adapter": "self_attention.linear_proj",
    "lora_hto4h_adapter": "mlp.linear_fc1",
    "lora_4htoh_adapter": "mlp.linear_fc2",
}
_ADAPTER_TENSORS = {
    f"{linear.split('.')[0]}.adapter_layer.{adapter}.{part}.weight": f"{linear}.{lora}"
    for adapter, linear in _ADAPTERS.items()
    for part, lora in (("linear_in", "lora_a"), ("linear_out", "lora_b"))
}
# megatron's tensor-parallel partition dim by steerlm name (a layer's tensors without `decoder.layers.N.`);
# the rest is replicated. NeMo-Aligner's rm_head is a RowParallelLinear: its weight is split along its input.
_PARTITION_DIM = {
    TIED_EMBEDDING: 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
    "attribute_head.weight": 1,
    # NeMo's ParallelLinearAdapter: linear_in is column-parallel (rank dim split) beside a column-parallel layer and
    # row-parallel (input split) beside a row-parallel one; linear_out is column-parallel (output split) for both
    "self_attention.linear_qkv.lora_a": 0,
    "self_attention.linear_qkv.lora_b": 0,
    "self_attention.linear_proj.lora_a": 1,
    "self_attention.linear_proj.lora_b": 0,
    "mlp.linear_fc1.lora_a": 0,
    "mlp.linear_fc1.lora_b": 0,
    "mlp.linear_fc2.lora_a": 1,
    "mlp.linear_fc2.lora_b": 0,
}
_GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc1.lora_b")  # [gate_r; up_r] per TP rank
_FIX = "import a NeMo megatron-core GPT model (or a NeMo-Aligner regression reward model) saved by NeMo 1.x"


def _unprefixed(key: str) -> str | None:
    if not key.startswith("model."):
        return None
    name = key[len("model.") :]
    return name[len("module.") :] if name.startswith("module.") else name


def steerlm_name(key: str, layer_offset: int = 0) -> str | None:
    """steerlm's global name for a NeMo state-dict key (layer number + `layer_offset`); None for no model tensor."""
    name = _unprefixed(key)
    if name is None:
        return None
    if name in _HEAD:
        return _HEAD[name]
    if name in _TOP_LEVEL:
        return name
    match = _LAYER.match(name)
    local = _layer_tensor(match.group(2)) if match else None
    if match is None or local is None:
        return None
    return unfused_norm_name(f"decoder.layers.{int(match.group(1)) + layer_offset}.{local}")


def _layer_tensor(local: str) -> str | None:
    """steerlm's name of a layer's tensor (without `decoder.layers.N.`; TE's fused norm names as NeMo's) for NeMo's,
    None for none."""
    return local if local in _LAYER_TENSORS else _ADAPTER_TENSORS.get(local)


def model_tensor_names(model: ModelConfig, head: bool = False) -> list[str]:
    """Global names of the tensors a steerlm GPTModel of this shape holds (the attribute head's with `head`)."""
    norm = ["weight"] + (["bias"] if model.normalization == Normalization.LayerNorm else [])
    linear = ["weight"] + (["bias"] if model.add_bias_linear else [])
    names = [TIED_EMBEDDING]
    if model.position_embedding_type == PositionEmbedding.learned_absolute:
        names.append("embedding.position_embeddings.weight")
    per_layer = [f"{n}.{p}" for n in ("input_layernorm", "pre_mlp_layernorm") for p in norm]
    per_layer += [f"{n}.{p}" for n in _LINEARS for p in linear]
    if model.add_qkv_bias and not model.add_bias_linear:  # Qwen2's
        per_layer.insert(per_layer.index("self_attention.linear_qkv.weight") + 1, "self_attention.linear_qkv.bias")
    names += [f"decoder.layers.{i}.{name}" for i in range(model.num_layers) for name in per_layer]
    names += [f"decoder.final_layernorm.{p}" for p in norm]
    if not model.share_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names + (["attribute_head.weight", "attribute_head.bias"] if head else [])


def _partition(name: str, gated: bool) -> tuple[int, int] | None:
    """(dim, stride) of a tensor-parallel tensor, None for a replicated one."""
    match = _LAYER.match(name)
    local = match.group(2) if match else name
    if local not in _PARTITION_DIM:
        return None
    return _PARTITION_DIM[local], 2 if gated and local in _GATED else 1


class _ArchiveFileSystem(FileSystem):
    """torch.distributed.checkpoint's file access, reading the members of a `.nemo` tar in place."""

    def __init__(self, archive: NemoArchive) -> None:
        self.archive = archive

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[IO[bytes]]:  # type: ignore[override]
        with self.archive.open(Path(path).as_posix()) as handle:
            yield handle

    def concat_path(self, path: str | os.PathLike, suffix: str) -> Path:
        return Path(path) / suffix

    def init_path(self, path: str | os.PathLike) -> Path:
        return Path(path)


class _DistributedWeights:
    """`model_weights/` as megatron's dist_checkpointing wrote it (`torch_dist`; zarr is refused)."""

    def __init__(self, archive: NemoArchive, num_layers: int) -> None:
        self.archive = archive
        with archive.open(f"{DIST_DIR}/metadata.json") as handle:
            backend = json.loads(handle.read()).get("sharded_backend")
        if backend != "torch_dist":
            raise DataError(
                archive.where(f"{DIST_DIR}/metadata.json"),
                None,
                "sharded_backend",
                f"{backend!r} is not torch_dist, the only distributed-checkpoint backend steerlm reads",
                "re-save the model with NeMo's dist_ckpt_format=torch_dist",
            )
        metadata = self._reader().read_metadata().state_dict_metadata
        # Objects (TE's _extra_state) hold no weights.
        self.tensors = {key: entry for key, entry in metadata.items() if isinstance(entry, TensorStorageMetadata)}
        self.index: dict[str, tuple[str, int | None]] = {}
        for key, entry in self.tensors.items():
            self._add(key, entry, num_layers)

    def _add(self, key: str, entry: TensorStorageMetadata, num_layers: int) -> None:
        name = _unprefixed(key) or ""
        stacked = _layer_tensor(name[len("decoder.layers.") :]) if name.startswith("decoder.layers.") else None
        if stacked is not None:
            if entry.size[0] != num_layers:
                raise DataError(self.where, None, key, f"stacks {entry.size[0]} layers, num_layers is {num_layers}")
            for layer in range(num_layers):
                self.index[unfused_norm_name(f"decoder.layers.{layer}.{stacked}")] = (key, layer)
            return
        found = steerlm_name(key)
        if found is None:
            raise DataError(self.where, None, key, "is not a tensor of a model steerlm reads", _FIX)
        self.index[found] = (key, None)

    @property
    def where(self) -> str:
        return self.archive.where(DIST_DIR)

    def _reader(self) -> FileSystemReader:
        local = self.archive.local_path(f"{DIST_DIR}/.metadata")
        if local is not None:
            return FileSystemReader(local.parent)
        reader = FileSystemReader(DIST_DIR)
        reader.fs = _ArchiveFileSystem(self.archive)
        return reader

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[self.index[name][0]].properties.dtype

    def rows(self, name: str) -> int:
        key, layer = self.index[name]
        return self.tensors[key].size[0 if layer is None else 1]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Each stored tensor is read once, whatever number of layers `names` take from it."""
        by_key: dict[str, list[str]] = {}
        for name in names:
            by_key.setdefault(self.index[name][0], []).append(name)
        out = {}
        for key, members in by_key.items():
            entry = self.tensors[key]
            tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
            _load_here({key: tensor}, self._reader())
            for name in members:
                layer = self.index[name][1]
                out[name] = tensor if layer is None else tensor[layer].clone()
        return out


_LOAD_TAKES_NO_DIST = "no_dist" in inspect.signature(dcp.load).parameters


def _load_here(state: dict[str, torch.Tensor], reader: FileSystemReader) -> None:
    """`dcp.load` of plain tensors in this process alone, whether or not a process group is initialised: every rank
    reads the tensors it needs on its own. torch 2.6's `dcp.load` has no `no_dist` (pyproject's floor); the function
    it calls, `_load_state_dict`, has taken it all along."""
    if not _LOAD_TAKES_NO_DIST:
        _load_state_dict(state, storage_reader=reader, no_dist=True)
        return
    with warnings.catch_warnings():  # no_dist is meant, as the warning assumes
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def _load_state(archive: NemoArchive, name: str, meta: bool = False) -> dict:
    """One rank's `model_weights.ckpt` (tensors on the meta device with `meta`: only keys and shapes are read)."""
    local = archive.local_path(name)
    try:
        with torch.serialization.safe_globals([io.BytesIO]):  # older TE saves _extra_state as BytesIO
            if local is not None:
                state = torch.load(local, map_location="meta" if meta else "cpu", mmap=not meta, weights_only=True)
            else:
                with archive.open(name) as handle:
                    state = torch.load(handle, map_location="meta" if meta else "cpu", weights_only=True)
    except Exception as error:  # torch raises many types for an unreadable pickle
        raise DataError(archive.where(name), None, None, f"cannot be read as a state dict: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(archive.where(name), None, None, "does not hold a state dict")
    return state


class _LegacyWeights:
    """`model_weights.ckpt` per (tp, pp) rank; the grid of rank files must be complete."""

    def __init__(self, archive: NemoArchive, files: dict[tuple[int, int], str], stage_layers: tuple[int, ...]) -> None:
        self.archive, self.files = archive, files
        self.tp = 1 + max(tp for tp, _ in files)
        self.index: dict[str, dict[int, tuple[str, str]]] = {}
        self.shapes: dict[str, list[torch.Size]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for (tp_rank, pp_rank), file in sorted(files.items()):
            offset, count = sum(stage_layers[:pp_rank]), stage_layers[pp_rank]
            for key, value in _load_state(archive, file, meta=True).items():
                if key.endswith(_EXTRA_STATE):
                    continue
                name = steerlm_name(key, offset)
                if name is None or not isinstance(value, torch.Tensor):
                    raise DataError(archive.where(file), None, key, "is not a tensor of a model steerlm reads", _FIX)
                match = _LAYER.match(_unprefixed(key) or "")
                if match and int(match.group(1)) >= count:
                    raise DataError(
                        archive.where(file), None, key, f"is past pipeline stage {pp_rank}'s {count} layers"
                    )
                self.index.setdefault(name, {})[tp_rank] = (file, key)
                self.shapes.setdefault(name, []).append(value.shape)
                self.dtypes[name] = value.dtype
        for ranks in self.index.values():
            if len(ranks) != self.tp:
                file, key = next(iter(ranks.values()))
                raise DataError(archive.where(file), None, key, f"is held by {len(ranks)} of the {self.tp} TP ranks")

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    def rows(self, name: str) -> int:
        dim = _partition(name, gated=False)
        return sum(shape[0] for shape in self.shapes[name]) if dim and dim[0] == 0 else self.shapes[name][0][0]

    def read(self, names: list[str], gated: bool) -> dict[str, torch.Tensor]:
        needed = sorted({file for name in names for file, _ in self.index[name].values()})
        states = {file: _load_state(self.archive, file) for file in needed}
        out = {}
        for name in names:
            shards = [states[file][key] for _, (file, key) in sorted(self.index[name].items())]
            partition = _partition(name, gated)
            out[name] = shards[0] if partition is None else unshard_along(shards, *partition)
        return out


def _legacy_files(archive: NemoArchive) -> dict[tuple[int, int], str]:
    if archive.has(LEGACY_FILE):
        return {(0, 0): LEGACY_FILE}
    files = {}
    for name in archive.names():
        match = _LEGACY_RANK.match(name)
        if match:
            tp, pp = match.group(1) or match.group(3), match.group(2) or match.group(4) or "0"
            files[(int(tp), int(pp))] = name
    return files


def archive_weights(archive: NemoArchive, config: dict) -> _DistributedWeights | _LegacyWeights:
    """The index of an archive's tensors by steerlm global name, in whichever of NeMo's layouts it holds them."""
    source = archive.where("model_config.yaml")
    if archive.has(f"{DIST_DIR}/metadata.json"):
        return _DistributedWeights(archive, layers_per_stage(config, source, 1)[0])
    files = _legacy_files(archive)
    if not files:
        raise DataError(str(archive.path), None, None, f"holds neither {DIST_DIR}/ nor {LEGACY_FILE} files", _FIX)
    pipeline = 1 + max(pp for _, pp in files)
    tensor = 1 + max(tp for tp, _ in files)
    missing = [(t, p) for t in range(tensor) for p in range(pipeline) if (t, p) not in files]
    if missing:
        raise DataError(str(archive.path), None, None, f"lacks the weights of (tp, pp) ranks {missing}")
    for key, ranks in (("tensor_model_parallel_size", tensor), ("pipeline_model_parallel_size", pipeline)):
        if config.get(key, 1) != ranks:
            raise DataError(source, None, key, f"{config.get(key, 1)!r} differs from the {ranks} ranks' files")
    return _LegacyWeights(archive, files, layers_per_stage(config, source, pipeline))


_NEMO_ADAPTER_TENSORS = {steerlm: nemo for nemo, steerlm in _ADAPTER_TENSORS.items()}


def legacy_rank_file(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """Where NeMo's legacy layout keeps rank (tp_rank, pp_rank)'s `model_weights.ckpt` (its
    `inject_model_parallel_rank`): at the root for one rank, `mp_rank_XX/` without PP, `tp_rank_XX_pp_rank_XXX/`."""
    if tp == 1 and pp == 1:
        return LEGACY_FILE
    if pp == 1:
        return f"mp_rank_{tp_rank:02d}/{LEGACY_FILE}"
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/{LEGACY_FILE}"


def legacy_adapter_states(
    full: dict[str, torch.Tensor], tp: int, stage_layers: tuple[int, ...], gated: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA adapters (full tensors by steerlm global name) as NeMo's PEFT training saves them: per (tp, pp) rank
    file (`legacy_rank_file`), a state dict of `model.decoder.layers.<stage-local layer>.…adapter_layer.…` keys
    holding NeMo's slices (`linear_in` split along the rank dim beside a column-parallel layer and along its input
    beside a row-parallel one, `linear_out` along its output; SwiGLU's fc1 `[gate_r; up_r]` with `gated`). The
    inverse of this module's reading of a legacy archive."""
    pp = len(stage_layers)
    starts = [sum(stage_layers[:stage]) for stage in range(pp)]
    states: dict[str, dict[str, torch.Tensor]] = {
        legacy_rank_file(t, p, tp, pp): {} for t in range(tp) for p in range(pp)
    }
    for name, tensor in full.items():
        match = _LAYER.match(name)
        if match is None or match.group(2) not in _NEMO_ADAPTER_TENSORS:
            raise ValueError(f"{name} is not a LoRA adapter of a decoder layer")
        layer = int(match.group(1))
        stage = max(p for p in range(pp) if starts[p] <= layer)
        key = f"model.decoder.layers.{layer - starts[stage]}.{_NEMO_ADAPTER_TENSORS[match.group(2)]}"
        partition = _partition(name, gated)
        assert partition is not None  # every adapter tensor is split over TP ranks in NeMo's layout
        for rank, piece in enumerate(shard_along(tensor, *partition, tp)):
            states[legacy_rank_file(rank, stage, tp, pp)][key] = piece
    return states


def read_full(weights: _DistributedWeights | _LegacyWeights, names: list[str], gated: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors by steerlm global name; `gated`: SwiGLU's fc1 (TP slices `[gate_r; up_r]`)."""
    unknown = [name for name in names if name not in weights.index]
    if unknown:
        raise KeyError(f"{weights.archive.path} has no tensor for {unknown[0]!r}")
    if isinstance(weights, _LegacyWeights):
        return weights.read(names, gated=gated)
    return weights.read(names)


class NemoCheckpoint:
    """A `.nemo` archive opened for import: the model it holds and its weights by steerlm global name."""

    def __init__(self, path: str | Path) -> None:
        self.archive = NemoArchive(path)
        try:
            self._open(Path(path))
        except BaseException:
            self.archive.close()
            raise

    def _open(self, path: Path) -> None:
        self.config = self.archive.read_config()
        self._weights = archive_weights(self.archive, self.config)
        if TIED_EMBEDDING not in self._weights.index:
            if any(lora.is_adapter(name) for name in self._weights.index):
                raise DataError(
                    str(self.archive.path),
                    None,
                    None,
                    "holds LoRA adapters alone (a NeMo PEFT archive), not a model",
                    "import it with recipes/convert.py input=<this archive> base=<the .nemo model it adapts>",
                )
            raise DataError(str(self.archive.path), None, f"model.{TIED_EMBEDDING}", "is missing", _FIX)
        rows = self._weights.rows(TIED_EMBEDDING)
        source = self.archive.where("model_config.yaml")
        self.nemo: NemoModel = nemo_model(self.config, source, rows, name=path.name.removesuffix(".nemo"))
        self._check_names()

    @property
    def model(self) -> ModelConfig:
        return self.nemo.model

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (the word embedding's)."""
        return self._weights.dtype(TIED_EMBEDDING)

    def _check_names(self) -> None:
        expected = model_tensor_names(self.model, head=self.nemo.reward_head is not None)
        held = set(self._weights.index)
        if self.model.share_embeddings_and_output_weights:
            held.discard("output_layer.weight")  # the last stage's copy of the tied embedding
        missing, unexpected = sorted(set(expected) - held), sorted(held - set(expected))
        if missing:
            raise DataError(
                str(self.archive.path),
                None,
                None,
                f"has no tensor for {', '.join(missing[:5])}",
                "the archive is incomplete, or its model_config.yaml describes another model",
            )
        if unexpected:
            raise DataError(
                str(self.archive.path),
                None,
                None,
                f"holds {', '.join(unexpected[:5])}, which model_config.yaml's model does not have",
                "check the archive's model_config.yaml against its weights",
            )

    def full_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors keyed by steerlm global name, read from the archive."""
        return read_full(self._weights, list(names), gated=self.model.gated_mlp)

    def load_into(self, chunks: list, tp_rank: int, tp: int, keep: Callable[[str], bool] = lambda name: False) -> None:
        """Copy the archive's weights into this rank's shards (any layout); `keep` names parameters left as they are."""
        names = [name for name, _ in named_global_parameters(chunks) if not keep(name)]
        load_full_parameters(chunks, self.full_tensors(names), tp_rank, tp, keep)

    def close(self) -> None:
        self.archive.close()

    def __enter__(self) -> NemoCheckpoint:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
