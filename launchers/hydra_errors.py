"""Hydra's composition failures as ConfigErrors that name the key the user typed, with a fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Optional, get_type_hints

from hydra.errors import HydraException, OverrideParseException

from steerlm.config import ConfigError
from steerlm.config.store import CONF_DIR


def _value_of(key: str, overrides: Sequence[str]) -> tuple[str, Optional[str]]:
    """(the key as the user wrote it, its value) for a key Hydra may report without its prefix."""
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key or name.endswith("." + key):
            return name, value
    return key, None


def _suggestion(key: str, schema: type, prefix: str) -> str:
    """`did you mean cluster.partition?`, walking into nested sections (cluster.container.*)."""
    section = prefix
    for part in key.split(".")[1:-1]:
        nested = get_type_hints(schema).get(part)
        if not (isinstance(nested, type) and is_dataclass(nested)):
            break
        schema, section = nested, f"{section}.{part}"
    names = [f.name for f in fields(schema)]
    close = difflib.get_close_matches(key.split(".")[-1], names, n=1)
    return f"did you mean {section}.{close[0]}?" if close else f"use one of the {section} settings: {', '.join(names)}"


def composition_error(
    error: HydraException,
    overrides: Sequence[str],
    schema: Optional[type],
    prefix: str,
    fix: str = "check the spelling",
) -> ConfigError:
    """Unknown key, wrong type, unknown group option or bad override syntax → ConfigError."""
    if isinstance(error, OverrideParseException):
        bad_key, _, bad_value = error.override.partition("=")
        return ConfigError(
            bad_key,
            bad_value,
            f"is not a valid Hydra override ({str(error).splitlines()[0]})",
            "quote values with special characters, e.g. 'cluster.sbatch_args=[\"--constraint=h100\"]'",
        )
    message = str(error).splitlines()[0]
    missing_option = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if missing_option:
        group, option = missing_option.groups()
        options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
        return ConfigError(
            group, option, f"there is no conf/{group}/{option}.yaml", f"use one of: {', '.join(options)}"
        )
    cause = error.__cause__ or error.__context__
    detail = str(cause).splitlines()[0] if cause else message
    match = re.search(r"override '([^']+)'", message) or re.search(r"Key '([^']+)'", detail)
    key = getattr(cause, "full_key", None) or (match.group(1) if match else prefix)
    key, value = _value_of(key, overrides)
    unknown_key = "not in" in detail or "Could not override" in message
    if not unknown_key:
        return ConfigError(key, value, detail, "use a value of the key's type")
    if schema is not None:
        fix = _suggestion(key, schema, prefix)
    return ConfigError(key, value, detail, fix)
