"""Which kind of model a path holds (a steerlm checkpoint, a Hugging Face directory, a NeMo archive) and the
`<stage>.init_from` check: what a config can tell about a weights source without importing the training stack."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Optional

from steerlm.errors import require

# Files that mark a steerlm checkpoint (steerlm.checkpoint.sharded.META) and a Hugging Face model directory;
# named here so validating a config does not import the training stack.
STEERLM_CHECKPOINT_FILE = "steerlm_checkpoint.json"
CHECKPOINTS = "checkpoints"  # a run directory's checkpoints, and the file naming its newest complete one:
LATEST = "latest"
SAVED_CONFIG_FILE = "config.yaml"  # the resolved config a checkpoint was written with
HF_CONFIG_FILE = "config.json"
NEMO_CONFIG_FILE = "model_config.yaml"  # the config of a NeMo 1.x `.nemo` archive (steerlm.models.nemo_archive)
STEERLM_SECTION = "steerlm"  # model_config.yaml's record of what a steerlm export came from (NeMo ignores it)


def is_hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json, as `save_pretrained` writes it), not a steerlm checkpoint."""
    return (path / HF_CONFIG_FILE).is_file() and not (path / STEERLM_CHECKPOINT_FILE).is_file()


def is_nemo_archive(path: Path) -> bool:
    """A NeMo 1.x `.nemo` model: a tar (plain or gzip'd; its contents are checked when it is read) or the
    directory it was extracted to (holding model_config.yaml)."""
    path = Path(path)
    if path.is_dir():
        return (path / NEMO_CONFIG_FILE).is_file() and not (path / STEERLM_CHECKPOINT_FILE).is_file()
    return path.is_file() and tarfile.is_tarfile(path)


def validate_init_from(key: str, value: Optional[str]) -> None:
    """`<stage>.init_from` names a steerlm run or checkpoint, an HF Llama, Nemotron, Qwen2, Qwen3 or Mistral with
    safetensors, or a NeMo `.nemo` model.

    Whether a steerlm directory holds a checkpoint, and whether the shapes fit, is checked when the run
    resolves it (`steerlm.training.init_from`); this is what a config alone can tell.
    """
    if value is None:
        return
    path = Path(value)
    require(
        path.is_dir() or is_nemo_archive(path),
        key,
        value,
        "is not a directory or a .nemo archive",
        "pass a steerlm training output_dir, one of its checkpoints/step_* directories, a Hugging Face "
        "Llama, Nemotron, Qwen2, Qwen3, Mistral, Phi-3, Gemma or Gemma 2 directory (config.json + *.safetensors) "
        f"or a NeMo .nemo model, or "
        f"{key}=null to start from scratch",
    )
    if is_hf_model_dir(path):
        require(
            any(path.glob("*.safetensors")),
            key,
            value,
            "is a Hugging Face model directory without *.safetensors weights",
            "save the model with `save_pretrained(dir)` (safetensors is its default) or convert its "
            "*.bin files to safetensors",
        )


def named_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint directory a run directory's `checkpoints/latest` names (whether or not it is complete), or
    None without that pointer."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def saved_config_file(path: Path) -> Optional[Path]:
    """The resolved config a steerlm checkpoint was written with: `path`'s own (a checkpoint directory) or that of
    the checkpoint a run directory's `checkpoints/latest` names; None when `path` is neither (yet). Reads no weights,
    so a launcher's dry run can size a job from it."""
    path = Path(path)
    checkpoint = path if (path / STEERLM_CHECKPOINT_FILE).is_file() else named_checkpoint(path)
    file = checkpoint / SAVED_CONFIG_FILE if checkpoint is not None else None
    return file if file is not None and file.is_file() else None
