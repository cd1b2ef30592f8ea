"""What serving or importing a NeMo `.nemo` model needs beyond its weights: the attribute schema and the tokenizer.

NeMo records neither the attribute names a SteerLM model was trained on nor those of a reward head's outputs;
NeMo-Aligner's SteerLM recipes use nine (`steerlm_oasst`: the OASST four, then HelpSteer's five, the order of its
`ALL_STEERLM_ATTRIBUTES`), so that is the default, and a reward head's output count must fit the schema.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from steerlm.config import AttributesConfig, to_typed
from steerlm.config.sources import STEERLM_SECTION
from steerlm.config.store import shipped_attributes
from steerlm.data.template import Tokenization
from steerlm.errors import ConfigError
from steerlm.models.nemo_archive import export_tokenizer
from steerlm.models.nemo_config import RewardHead
from steerlm.models.nemo_weights import NemoCheckpoint

DEFAULT_SCHEMA = "steerlm_oasst"
_SHIPPED_BY_SIZE = {9: "steerlm_oasst", 5: "helpsteer2"}


def steerlm_record(config: dict) -> dict:
    """The `steerlm` section of an archive steerlm exported (`recipes/convert.py to=nemo`): the source, its attribute
    schema and its template's tokenization, which NeMo does not record; empty for NeMo's own archives."""
    record = config.get(STEERLM_SECTION)
    return record if isinstance(record, dict) else {}


def nemo_tokenization(config: dict) -> Tokenization:
    """How the archive's model tokenises the SteerLM template: as its steerlm source was trained (an archive steerlm
    exported), else NeMo-Aligner's ids."""
    return Tokenization(steerlm_record(config).get("tokenization") or Tokenization.nemo.value)


def nemo_attributes(
    location: str, head: RewardHead | None, attributes: AttributesConfig | None, config: dict | None = None
) -> AttributesConfig:
    """The schema of an imported model: `attributes` when given, else the one a steerlm export recorded in the
    archive's `config`, else NeMo-Aligner's nine (or, for a reward head of five outputs, HelpSteer2's five).
    ConfigError naming `attributes` when the head's outputs do not fit."""
    count = head.num_attributes if head is not None else None
    recorded = steerlm_record(config or {}).get("attributes")
    if attributes is None and recorded is not None:
        attributes = to_typed(OmegaConf.create(recorded), AttributesConfig)
    if attributes is None:
        if count is not None and count not in _SHIPPED_BY_SIZE:
            raise ConfigError(
                "attributes",
                None,
                f"the reward head of {location} emits {count} scores and NeMo does not record their names",
                f"pass a schema of {count} attributes in the head's output order (attributes.attributes=[...])",
            )
        return shipped_attributes(_SHIPPED_BY_SIZE[count] if count is not None else DEFAULT_SCHEMA)
    if count is not None and len(attributes.attributes) != count:
        raise ConfigError(
            "attributes",
            list(attributes.attributes),
            f"has {len(attributes.attributes)} attributes, the reward head of {location} emits {count} scores",
            f"pass a schema of {count} attributes in the head's output order",
        )
    return attributes


def write_tokenizer(source: NemoCheckpoint, destination: Path, tokenizer_path: str | Path | None = None) -> None:
    """The archive's tokenizer (or the directory `tokenizer_path`) as a directory steerlm's `hf` loader reads."""
    if tokenizer_path is not None:
        shutil.copytree(tokenizer_path, destination, dirs_exist_ok=True)
    else:
        export_tokenizer(source.archive, source.config, destination)


def cached_tokenizer(source: NemoCheckpoint) -> Path:
    """The archive's tokenizer copied once under the temporary directory, keyed by the archive's path, size and
    time (every rank of a job may call this at once: each writes its own copy and renames it into place)."""
    stat = source.archive.path.stat()
    key = f"{source.archive.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    destination = Path(tempfile.gettempdir()) / "steerlm-nemo-tokenizers" / hashlib.sha256(key).hexdigest()[:16]
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent))
    write_tokenizer(source, staging)
    try:
        os.rename(staging, destination)
    except OSError:  # another rank renamed its identical copy first
        shutil.rmtree(staging, ignore_errors=True)
    return destination
