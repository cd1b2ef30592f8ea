"""Sharded, atomic, layout-portable training checkpoints (megatron dist_checkpointing).

Layout of `<output_dir>/checkpoints/`:

    step_0000020/            a complete checkpoint (model, optimizer, LR schedule, step, RNG)
      steerlm_checkpoint.json  step, layout and model shape it was written with
      checksums.json           size and SHA-256 of every other file, written last (steerlm.checkpoint.integrity)
    latest                   text file naming the newest complete checkpoint
    .tmp_step_0000040/       a save in progress (ignored; removed by the next save)
    corrupt.step_0000060/    a damaged checkpoint a resume stepped over (kept for inspection, never loaded)

A save writes into the temporary directory, renames it into place and only then moves `latest`, so a
job killed at any moment leaves the previous checkpoint intact. Model and optimizer tensors are
stored by global name and offset, so a checkpoint written at one TP/PP layout loads at another
(weights and Adam moments); RNG states are restored only at the layout they were saved with.
A resume verifies the checksums (`checkpoint.verify`) and falls back from a damaged latest checkpoint to
the newest intact one; every other load refuses a damaged checkpoint, naming the file.

A LoRA run started from other weights saves its trained parameters alone (`lora.checkpoint`): its metadata names
the base (`steerlm.checkpoint.sources.BaseWeights`), and every load reads the base first, then the adapters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CONFIG_FNAME, maybe_load_config
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from steerlm.checkpoint.integrity import CheckpointError, file_digests, verify_checksums, write_checksums
from steerlm.checkpoint.sources import BaseWeights, WeightFormat, read_foreign_weights
from steerlm.checkpoint.writers import writers_die_with_parent
from steerlm.config.lora import LoraConfig
from steerlm.config.schema import MODEL_SHAPE_FIELDS, ModelConfig, TrainConfig, written_model_field
from steerlm.config.sources import CHECKPOINTS, LATEST, SAVED_CONFIG_FILE, STEERLM_CHECKPOINT_FILE, named_checkpoint
from steerlm.config.store import save_resolved
from steerlm.errors import ConfigError
from steerlm.files import atomic_write_text
from steerlm.megatron_compat import (
    AsyncShardWrite,
    TranslatedLoad,
    complete_torch_adam_state,
    load_optimizer_state,
    use_in_process_save_queue,
)
from steerlm.models import lora
from steerlm.models.attribute import is_head
from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)


class TrainingState(Protocol):
    """What a save needs of a training run (`steerlm.training.TrainingSetup` is one). Without an optimizer
    (and scheduler) the checkpoint holds weights only (`recipes/convert.py` and the `.nemo` import write such
    from other formats): it loads as weights (`load_weights`) but cannot be resumed as a run. With a `base` it
    holds the trained parameters alone (`lora.trained`), the frozen ones being that base's."""

    model: list
    optimizer: Any
    scheduler: Any

    @property
    def base(self) -> BaseWeights | None: ...


@dataclass
class WeightsOnly:
    """A model without optimizer or schedule: what `save_checkpoint` writes as a weights-only checkpoint."""

    model: list
    optimizer: None = None
    scheduler: None = None
    base: BaseWeights | None = None  # adapters alone on these weights (an imported NeMo LoRA archive)


META = STEERLM_CHECKPOINT_FILE
QUARANTINE = "corrupt."
TORCH_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
FORMAT = 1
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
TRANSLATED = "optimizer_translated"  # a load request's key for optimizer state another layout saved
# Model fields that change tensor shapes or meaning; any difference makes a checkpoint unusable.
SHAPE_FIELDS = (*MODEL_SHAPE_FIELDS, "vocab_size", "make_vocab_size_divisible_by")


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    layout: dict
    model: dict
    format: int = FORMAT
    weights_only: bool = False  # no optimizer, schedule or RNG to resume: a run starts from it with init_from
    lora: dict | None = None  # LoraConfig.describe() of the adapters it holds beside the frozen weights
    base: dict | None = None  # BaseWeights of the frozen weights, when it holds only the trained ones


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def _layout_key(layout: ParallelLayout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp}


def _model_key(model: ModelConfig) -> dict:
    return {name: (value.value if isinstance(value, Enum) else value) for name, value in asdict(model).items()}


def unwrap(chunk: torch.nn.Module) -> MegatronModule:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = cast(torch.nn.Module, chunk.module)  # the wrappers keep the wrapped module there
    return chunk


def _model_keys(model: list) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{index}" for index in range(len(model))]


def _rng_object(layout: ParallelLayout, state: dict | None = None) -> ShardedObject:
    """This rank's RNG state as one cell of a (pp, tp, cp, dp) grid of objects."""
    if state is None:
        state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject(
        "rng_state",
        state,
        (layout.pp, layout.tp, layout.cp, layout.dp),
        (layout.pp_rank, layout.tp_rank, layout.cp_rank, layout.dp_rank),
        replica_id=0,
    )


def _sharded_state(
    model: list, optimizer, layout: ParallelLayout, is_loading: bool, with_rng: bool, trained_only: bool = False
) -> dict:
    """The state a checkpoint holds; `trained_only`: of the model, the parameters a LoRA run trains alone."""
    state: dict = {}
    for key, chunk in zip(_model_keys(model), model):
        state[key] = unwrap(chunk).sharded_state_dict()
        if trained_only:
            state[key] = {name: value for name, value in state[key].items() if lora.trained(name)}
    if optimizer is not None:
        # The distributed optimizer's layout-independent format (each parameter's state at its
        # full shape, so it loads at any TP/PP/DP size); the plain optimizer always stores it that way
        # and ignores the option.
        complete_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)
    if with_rng:
        state["rng_state"] = _rng_object(layout)
    return state


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    path = named_checkpoint(output_dir)
    if path is None:
        return None
    if not (path / META).exists():
        raise FileNotFoundError(
            f"{checkpoint_root(output_dir) / LATEST} names {path.name}, which is missing or incomplete; delete the "
            "pointer to start over or restore the directory"
        )
    return path


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        path,
        f"cannot be read ({type(error).__name__}: {error})",
        "delete this checkpoint directory (a resume then uses the previous one) or restore it from a copy",
    )


def read_meta(path: Path) -> CheckpointMeta:
    file = Path(path) / META
    try:
        return CheckpointMeta(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise _unreadable(file, error) from None


def saved_config(path: Path):
    """The resolved config a checkpoint was written with (an OmegaConf DictConfig)."""
    from omegaconf import OmegaConf

    file = Path(path) / SAVED_CONFIG_FILE
    try:
        return OmegaConf.load(file)
    except Exception as error:  # yaml's and OmegaConf's errors share no base class below Exception
        raise _unreadable(file, error) from None


def check_readable(path: Path) -> None:
    """Read the small files a load starts with, so a garbled one is named instead of failing inside torch."""
    read_meta(path)
    readers = (
        (CONFIG_FNAME, lambda: maybe_load_config(str(path))),
        (COMMON_STATE_FNAME, lambda: dist_checkpointing.load_common_state_dict(str(path))),
        (TORCH_METADATA, lambda: FileSystemReader(str(path)).read_metadata()),
    )
    for name, read in readers:
        if not (path / name).is_file():
            raise CheckpointError(path / name, "is missing", "restore the checkpoint or delete its directory")
        try:
            read()
        except Exception as error:  # json, pickle, torch and megatron errors share no narrower base
            raise _unreadable(path / name, error) from None


def check_checkpoints_writable(output_dir: Path) -> None:
    """Refuse, before step 1, a run whose checkpoints could not be written (naming the directory). Nothing is left
    behind: a run refused later, before training (bad data), leaves no checkpoints/ directory."""
    root = checkpoint_root(output_dir)
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(20, "not a directory")
        # a directory made where checkpoints/ is (or would be created) proves both the creation and the writes
        with tempfile.TemporaryDirectory(dir=root if root.is_dir() else output_dir, prefix=".write_test_"):
            pass
    except OSError as error:
        raise ConfigError(
            "output_dir",
            str(output_dir),
            f"checkpoints cannot be written to {root} ({error.strerror or error})",
            f"make {root} a writable directory, or pass another output_dir",
        ) from None


def check_compatible(path: Path, model: ModelConfig) -> CheckpointMeta:
    """Refuse a checkpoint written for another model shape, naming the first differing field."""
    meta = read_meta(path)
    current = _model_key(model)
    for name in SHAPE_FIELDS:
        written = written_model_field(meta.model, name)
        if written != current[name]:
            raise ConfigError(
                f"model.{name}",
                current[name],
                f"checkpoint {path} was written for model.{name}={written!r}",
                "use the checkpoint's model, a new output_dir, or checkpoint.resume=false",
            )
    return meta


def save_checkpoint(
    output_dir: Path, step: int, setup: TrainingState, layout: ParallelLayout, cfg: TrainConfig
) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the checkpoint atomically (with the
    resolved config that produced it)."""
    started = _start_save(output_dir, step, setup, layout)
    if isinstance(started, Path):
        return started
    state, publication = started
    write_sharded(state, publication.tmp)
    return publication.publish(setup, layout, cfg)


def write_sharded(state: dict, directory: Path) -> None:
    """Collective: megatron's synchronous distributed save of `state` (sharded tensors and objects) into the
    existing empty `directory`, its writer processes killed with this one."""
    use_in_process_save_queue()
    with writers_die_with_parent():
        dist_checkpointing.save(state, str(directory))


class AsyncSave:
    """A checkpoint whose shards a forked process writes while training goes on (`checkpoint.async_save`);
    `published` finishes it. Its tensors are those of the step it was started at: the fork is the snapshot
    on CPU, megatron's copy into host memory on GPU."""

    def __init__(self, output_dir: Path, step: int, setup: TrainingState, layout: ParallelLayout, cfg: TrainConfig):
        self.step, self.setup, self.layout, self.cfg = step, setup, layout, cfg
        started = _start_save(output_dir, step, setup, layout)
        self.write: AsyncShardWrite | None = None
        if isinstance(started, Path):
            self.path = started
            return
        state, self.publication = started
        self.path = self.publication.final
        in_writer = file_digests if cfg.checkpoint.verify else None
        with writers_die_with_parent():
            self.write = AsyncShardWrite(state, self.publication.tmp, in_writer)

    def published(self, blocking: bool) -> bool:
        """Collective: whether the checkpoint is complete and published (waiting for its writers when
        `blocking`). A writer's failure is a CheckpointError on every rank; the previous checkpoint stays."""
        if self.write is None:
            return True
        try:
            if not self.write.finished(blocking):
                return False
        except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
            self.write = None  # its writers have ended: nothing left to abandon
            raise CheckpointError(
                self.publication.tmp,
                f"writing step {self.step}'s checkpoint failed ({type(error).__name__}: {error})",
                "check the space and permissions of the checkpoints directory; the previous checkpoint is "
                "still the latest, so the run resumes from it",
            ) from error
        self.publication.publish(self.setup, self.layout, self.cfg, self.write.in_writer_result or {})
        self.write = None
        return True

    @property
    def in_flight(self) -> bool:
        """Whether its writers may still be running (neither published nor failed nor abandoned)."""
        return self.write is not None

    def abandon(self) -> None:
        """Local: kill this rank's writer; the partial checkpoint stays unpublished (the next save removes it)."""
        if self.write is not None:
            self.write.abandon()
            self.write = None


@dataclass
class _Publication:
    """A checkpoint being written into `tmp`, to be renamed to `final` once complete."""

    step: int
    root: Path
    tmp: Path
    final: Path

    def publish(
        self, setup: TrainingState, layout: ParallelLayout, cfg: TrainConfig, digests: dict | None = None
    ) -> Path:
        """Collective, once every shard is written: the config, metadata and checksums (`digests`: those this
        rank already has), then the rename into place, `latest` and pruning by rank 0."""
        dist.barrier()
        if layout.is_rank_zero:
            save_resolved(cfg, self.tmp / SAVED_CONFIG_FILE)
            adapters = lora.config_of(unwrap(setup.model[0]))
            meta = CheckpointMeta(
                self.step,
                _layout_key(layout),
                _model_key(cfg.model),
                weights_only=setup.optimizer is None,
                lora=adapters.describe() if adapters is not None else None,
                base=asdict(setup.base) if setup.base is not None else None,
            )
            (self.tmp / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        dist.barrier()
        if cfg.checkpoint.verify:
            write_checksums(self.tmp, digests)
        if layout.is_rank_zero:
            os.replace(self.tmp, self.final)
            atomic_write_text(self.root / LATEST, self.final.name + "\n")
            _prune(self.root, cfg.checkpoint.keep_last, keep=self.final)
            log.info("saved checkpoint %s", self.final)
        dist.barrier()
        return self.final


def _start_save(
    output_dir: Path, step: int, setup: TrainingState, layout: ParallelLayout
) -> Path | tuple[dict, _Publication]:
    """Collective: the state to write and an empty temporary directory for it, or the checkpoint's path when
    this step's is already complete (e.g. a signal arrived right after a scheduled save of this step)."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f".tmp_{name}"
    if final.exists():
        return final
    if layout.is_rank_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    weights_only = setup.optimizer is None
    state = _sharded_state(
        setup.model, setup.optimizer, layout, is_loading=False, with_rng=not weights_only, trained_only=bool(setup.base)
    )
    if not weights_only:
        state["scheduler"] = setup.scheduler.state_dict()
    state["step"] = step
    return state, _Publication(step, root, tmp, final)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    complete = sorted(path for path in root.glob("step_*") if (path / META).exists())
    for path in complete[:-keep_last]:
        if path != keep:
            shutil.rmtree(path)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: Path, verify: bool = True) -> None:
    """Collective: refuse a damaged checkpoint with a CheckpointError naming the file (checksums when `verify`
    and the checkpoint has them; the small index files always)."""
    if verify and not verify_checksums(path):
        log.warning(
            "%s has no checksums (saved with checkpoint.verify=false or by an older steerlm): not verified", path
        )
    check_readable(path)


def load_checkpoint(
    path: Path,
    model: list,
    optimizer,
    scheduler,
    layout: ParallelLayout,
    model_cfg: ModelConfig,
    keep: Callable[[str], bool] = lambda name: False,
    verify: bool = True,
) -> int:
    """Load weights, optimizer state and LR schedule into this layout's model; returns the step.

    With `optimizer=None` only the weights are loaded (inference, annotation, initialising a new run);
    RNG states are then left alone too, a checkpoint's LoRA adapters are merged into the weights they adapt
    (`load_adapters` reads them alone, as trained), and the model's own adapters (a LoRA run starting from these
    weights) keep their values. Weights whose state-dict name `keep` accepts are neither read nor changed (a head
    the checkpoint does not have). A damaged checkpoint is refused with a CheckpointError naming the file
    (`verify_checkpoint`; with `verify=False` the checksums are skipped). A checkpoint of adapters alone reads its
    base first (refused, naming the base's path, when that is gone or changed).
    """
    verify_checkpoint(path, verify)
    meta = check_compatible(path, model_cfg)
    if optimizer is not None and meta.weights_only:
        raise ConfigError(
            "checkpoint.resume",
            True,
            f"{path} holds weights only (converted by recipes/convert.py), nothing to resume training from",
            "start a new run from it with sft.init_from / apm.init_from / pretrain.init_from=<that directory>",
        )
    chunks = [unwrap(chunk) for chunk in model]
    if optimizer is not None:
        _check_same_adapters(path, meta.lora, lora.config_of(chunks[0]))
        _read_base(path, meta, model, layout, model_cfg, verify)
        return _load(path, meta, model, optimizer, scheduler, layout, keep, trained_only=meta.base is not None)
    own = lora.detach(chunks)
    try:
        _read_base(path, meta, model, layout, model_cfg, verify)
        if meta.lora is not None:
            lora.attach(chunks, LoraConfig(**meta.lora), seed=0)  # their values come from the checkpoint
        step = _load(path, meta, model, None, None, layout, keep, trained_only=meta.base is not None)
        lora.merge(chunks)
    finally:
        lora.detach(chunks)
        lora.reattach(chunks, own)
    return step


def load_adapters(path: Path, model: list, layout: ParallelLayout, model_cfg: ModelConfig, verify: bool = True) -> int:
    """Only a LoRA checkpoint's trained parameters (its adapters, an APM's head), attached to `model` (without
    adapters of its own) as trained; returns the step. Neither its frozen weights nor its base's are read, so the
    model's other weights stay as they are: what a PEFT export needs, in seconds for a model of any size."""
    verify_checkpoint(path, verify)
    meta = check_compatible(path, model_cfg)
    if meta.lora is None:
        raise ValueError(f"{path} holds no LoRA adapters")
    chunks = [unwrap(chunk) for chunk in model]
    lora.attach(chunks, LoraConfig(**meta.lora), seed=0)
    return _load(path, meta, model, None, None, layout, lambda name: False, trained_only=True)


def read_weights(
    format: WeightFormat,
    path: Path,
    model: list,
    layout: ParallelLayout,
    model_cfg: ModelConfig,
    keep: Callable[[str], bool] = lambda name: False,
    verify: bool = True,
) -> None:
    """Collective: the weights of a steerlm checkpoint (`load_weights`, its adapters merged), a Hugging Face
    directory or a `.nemo` model, in this layout's shards. Parameters `keep` accepts, and the model's own adapters,
    are left as they are."""
    if format == WeightFormat.steerlm:
        load_weights(path, model, layout, model_cfg, keep=keep, verify=verify)
    else:
        chunks = [unwrap(chunk) for chunk in model]
        read_foreign_weights(
            format, path, chunks, layout.tp_rank, layout.tp, model_cfg, lambda name: keep(name) or lora.is_adapter(name)
        )


def _read_base(
    path: Path, meta: CheckpointMeta, model: list, layout: ParallelLayout, model_cfg: ModelConfig, verify: bool
) -> None:
    """The frozen weights of a checkpoint that holds only the trained ones: its base's (collective)."""
    if meta.base is None:
        return
    base = BaseWeights(**meta.base)
    base.check(path)
    log.info("%s holds LoRA adapters alone: reading its base %s (%s)", path, base.path, base.format)
    # the checkpoint holds the head; the model's own adapters are left alone by any read
    read_weights(base.weight_format, Path(base.path), model, layout, model_cfg, keep=is_head, verify=verify)


def _check_same_adapters(path: Path, saved: dict | None, own: LoraConfig | None) -> None:
    """A run resumes with the adapters it was saved with: other ones would not fit its optimizer state."""
    ours = own.describe() if own is not None else None
    if saved != ours:
        raise ConfigError(
            "lora.rank",
            own.rank if own is not None else 0,
            f"checkpoint {path} was saved by a run with {f'LoRA adapters {saved}' if saved else 'no adapters'}, "
            f"this run has {f'LoRA adapters {ours}' if ours else 'none'}",
            "resume with the checkpoint's lora.* settings, or start a new output_dir with init_from=<that run> "
            "(its adapters are then merged into the weights)",
        )


def _translated_load(path: Path, model: list, optimizer, state: dict) -> TranslatedLoad | None:
    """How to read a checkpoint whose optimizer state another kind of optimizer or another precision laid out,
    when one did: a run may switch `parallel.use_distributed_optimizer` or `precision.dtype` when it resumes.
    Takes this optimizer's request out of `state` and redirects the model's where needed."""
    if optimizer is None:
        return None
    saved = dist_checkpointing.load_common_state_dict(str(path))["optimizer"]
    if not TranslatedLoad.needed(optimizer, state["optimizer"], saved):
        return None
    model_state = {key: state[key] for key in _model_keys(model)}
    translated = TranslatedLoad(optimizer, state.pop("optimizer"), saved, model_state)
    log.info("%s: optimizer state %s", path, translated.describe())
    return translated


def _load(
    path: Path,
    meta: CheckpointMeta,
    model: list,
    optimizer,
    scheduler,
    layout: ParallelLayout,
    keep: Callable[[str], bool],
    trained_only: bool,
) -> int:
    """Read the state `model` (and `optimizer`) asks for; `trained_only`: of the model, the parameters a LoRA run
    trains (an adapters-only checkpoint's frozen weights came from its base)."""
    same_layout = meta.layout == _layout_key(layout) and optimizer is not None
    state = _sharded_state(model, optimizer, layout, is_loading=True, with_rng=same_layout, trained_only=trained_only)
    for key in _model_keys(model):
        state[key] = {name: value for name, value in state[key].items() if not keep(name)}
    translated = _translated_load(path, model, optimizer, state)
    if translated is not None:
        state[TRANSLATED] = translated.request
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as error:  # torch's readers raise anything, even a BaseException
        raise CheckpointError(
            path,
            f"its shards cannot be read ({type(error).__name__}: {error})",
            "a shard file is damaged: with checkpoint.verify=true its checksum names it; delete this checkpoint "
            "directory (a resume then uses the previous one) or restore it from a copy",
        ) from None
    for key, chunk in zip(_model_keys(model), model):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        # left unread: what `keep` names, and an adapters-only checkpoint's frozen weights (its base's)
        left = [name for name in missing if not keep(name) and (not trained_only or lora.trained(name))]
        if unexpected or left:
            raise RuntimeError(f"{path}: state does not fit the model (missing {missing}, unexpected {unexpected})")
    if optimizer is not None:
        load_optimizer_state(
            optimizer, translated.state(loaded, loaded[TRANSLATED]) if translated else loaded["optimizer"]
        )
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    elif optimizer is not None:
        log.info("checkpoint written at %s, loading at %s: RNG states start fresh", meta.layout, _layout_key(layout))
    log.info(
        "loaded %s from %s (step %d)", "training state" if optimizer is not None else "weights", path, loaded["step"]
    )
    return int(loaded["step"])


def load_weights(
    path: Path,
    model: list,
    layout: ParallelLayout,
    model_cfg: ModelConfig,
    keep: Callable[[str], bool] = lambda name: False,
    verify: bool = True,
) -> int:
    """Only the model weights of a checkpoint (any layout), its LoRA adapters merged (`load_checkpoint`); returns
    the step it was saved at."""
    return load_checkpoint(path, model, None, None, layout, model_cfg, keep, verify)


def resume_checkpoint(output_dir: Path, verify: bool) -> Path | None:
    """Collective: the checkpoint a run resumes from — `latest`, or when that one is damaged the newest intact
    older one (with a warning). Rank 0 moves each damaged checkpoint aside to `corrupt.step_*` and points
    `latest` at the one chosen, so the steps after it are saved again. None when the run has no checkpoint;
    a CheckpointError naming every damaged file when no checkpoint is intact."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    complete = sorted(checkpoint_root(output_dir).glob("step_*"), reverse=True)
    older = [path for path in complete if path.name < latest.name and (path / META).is_file()]
    damaged: list[CheckpointError] = []
    for path in [latest, *older]:
        try:
            verify_checkpoint(path, verify)
        except CheckpointError as error:
            log.warning("%s", error)
            damaged.append(error)
            continue
        if damaged:
            _set_aside(output_dir, [error.path for error in damaged], path)
        return path
    raise CheckpointError(
        latest,
        "no checkpoint of this run is intact (" + "; ".join(str(error) for error in damaged) + ")",
        "restore a checkpoint from a copy, or start over with checkpoint.resume=false or another output_dir",
    )


def _set_aside(output_dir: Path, damaged: list[Path], chosen: Path) -> None:
    """Rank 0 renames each damaged checkpoint to `corrupt.<name>` and points `latest` at `chosen` (collective)."""
    root = checkpoint_root(output_dir)
    directories = sorted({root / path.relative_to(root).parts[0] for path in damaged})
    log.warning(
        "resuming from %s, the newest intact checkpoint; set aside as damaged: %s",
        chosen,
        ", ".join(f"{path.name} -> {QUARANTINE}{path.name}" for path in directories),
    )
    if dist.get_rank() == 0:
        for directory in directories:
            target = root / f"{QUARANTINE}{directory.name}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(directory, target)
        atomic_write_text(root / LATEST, chosen.name + "\n")
    dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose `checkpoints/latest` names one."""
    path = Path(path)
    if (path / META).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint (no {META}) nor a run directory with "
            f"{CHECKPOINTS}/{LATEST}; pass a training output_dir or one of its checkpoints"
        )
    return latest


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
