"""A NeMo 1.x `.nemo` model read in place: the tar NeMo writes (plain or gzip'd) or the directory it was
extracted to, without nemo_toolkit.

NeMo's SaveRestoreConnector tars a directory holding `model_config.yaml`, the weights (`model_weights/`, a
megatron distributed checkpoint, or `model_weights.ckpt` per tensor/pipeline rank) and the artifacts the config
names as `nemo:<file>` (the tokenizer). Members are read straight from the tar (seeking in an uncompressed
one), so nothing is extracted: every rank reads only what its shards need.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steerlm.config.schema import NEMO_CONFIG_FILE
from steerlm.errors import DataError

ARTIFACT_PREFIX = "nemo:"


class NemoArchive:
    """The files of a `.nemo` archive by their path inside it (`model_weights/.metadata`, `mp_rank_00/...`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._files: dict[str, Path] = {}
        if self.path.is_dir():
            self._files = {
                file.relative_to(self.path).as_posix(): file for file in self.path.rglob("*") if file.is_file()
            }
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self._tar = tarfile.open(self.path, "r:*")
            self._members = {_clean(member.name): member for member in self._tar.getmembers() if member.isfile()}
        else:
            raise FileNotFoundError(
                f"{self.path} is neither a .nemo archive (a tar) nor a directory extracted from one"
            )
        if not self.has(NEMO_CONFIG_FILE):
            raise DataError(
                str(self.path),
                None,
                None,
                f"holds no {NEMO_CONFIG_FILE}, so it is not a NeMo model",
                "pass the .nemo file NeMo's save_to wrote, or the directory it was extracted to",
            )

    def names(self) -> list[str]:
        return sorted(self._members if self._tar is not None else self._files)

    def has(self, name: str) -> bool:
        return name in (self._members if self._tar is not None else self._files)

    def has_directory(self, name: str) -> bool:
        prefix = name.rstrip("/") + "/"
        return any(file.startswith(prefix) for file in self.names())

    def where(self, name: str) -> str:
        """`name` as error messages show it: the archive, then the path inside it."""
        return f"{self.path}/{name}" if self._tar is None else f"{self.path}:{name}"

    def local_path(self, name: str) -> Path | None:
        """A file on disk (an extracted archive; torch can memory-map it), or None inside a tar."""
        return self._files.get(name)

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """A binary, seekable reader of one member."""
        if not self.has(name):
            raise FileNotFoundError(f"{self.where(name)} does not exist")
        handle: IO[bytes] | None
        if self._tar is None:
            handle = open(self._files[name], "rb")
        else:
            handle = self._tar.extractfile(self._members[name])
        if handle is None:
            raise FileNotFoundError(f"{self.where(name)} is not a regular file")
        with handle:
            yield handle

    def read_config(self) -> dict:
        """`model_config.yaml` as plain data (`model:` unwrapped, as NeMo's restore does)."""
        with self.open(NEMO_CONFIG_FILE) as handle:
            node = OmegaConf.create(handle.read().decode("utf-8"))
        try:
            config = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException:  # a resolver only NeMo registers: the keys steerlm reads are plain values
            config = OmegaConf.to_container(node, resolve=False)
        if not isinstance(config, dict):
            raise DataError(self.where(NEMO_CONFIG_FILE), None, None, "is not a mapping of config keys")
        return config["model"] if isinstance(config.get("model"), dict) else config

    def artifact(self, value: str) -> str | None:
        """The member a config value `nemo:<file>` names (None for a value that is no artifact)."""
        if not value.startswith(ARTIFACT_PREFIX):
            return None
        return _clean(value[len(ARTIFACT_PREFIX) :])

    def copy_out(self, name: str, destination: Path) -> None:
        """Copy a member file, or every file under a member directory, to `destination`."""
        if self.has(name):
            destination.parent.mkdir(parents=True, exist_ok=True)
            with self.open(name) as source, open(destination, "wb") as target:
                shutil.copyfileobj(source, target)
            return
        prefix = name.rstrip("/") + "/"
        inside = [file for file in self.names() if file.startswith(prefix)]
        if not inside:
            raise FileNotFoundError(f"{self.where(name)} does not exist")
        for file in inside:
            self.copy_out(file, destination / file[len(prefix) :])

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _clean(name: str) -> str:
    """Member names as NeMo writes them (`./model_config.yaml`) → `model_config.yaml`."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_member(archive: NemoArchive, config: dict) -> tuple[str, str]:
    """(library, member) of the tokenizer `config["tokenizer"]` names inside the archive.

    NeMo's `sentencepiece` library keeps the model as the artifact `tokenizer.model`; a `huggingface` tokenizer
    is read when `tokenizer.type` is an artifact directory. A Hub name, or a path on the machine that wrote the
    archive, is refused: pass that tokenizer's directory instead.
    """
    tokenizer = config.get("tokenizer") or {}
    library = str(tokenizer.get("library"))
    key = {"sentencepiece": "model", "huggingface": "type"}.get(library)
    source = archive.where(NEMO_CONFIG_FILE)
    fix = "pass the tokenizer's local directory (tokenizer.json, or tokenizer.model with tokenizer_config.json)"
    if key is None:
        raise DataError(source, None, "tokenizer.library", f"{library!r} is not sentencepiece or huggingface", fix)
    value = str(tokenizer.get(key) or "")
    member = archive.artifact(value) or value
    if not member or not (archive.has(member) or archive.has_directory(member)):
        raise DataError(source, None, f"tokenizer.{key}", f"{value!r} names no file inside the archive", fix)
    return library, member


def export_tokenizer(archive: NemoArchive, config: dict, destination: Path) -> None:
    """Write the archive's tokenizer as a directory steerlm's `hf` tokenizer reads: a SentencePiece model with a
    `tokenizer_config.json` naming transformers' SentencePiece class (docs/tokenizers.md), or the HF directory."""
    library, member = tokenizer_member(archive, config)
    destination.mkdir(parents=True, exist_ok=True)
    if library == "sentencepiece":
        archive.copy_out(member, destination / "tokenizer.model")
        (destination / HF_TOKENIZER_CONFIG).write_text('{"tokenizer_class": "LlamaTokenizer"}\n')
    else:
        archive.copy_out(member, destination)
