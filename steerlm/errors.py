"""The two error types every layer raises for bad user input: configuration and data.

They live at the bottom of the package (below `tokenizers`, `data` and `config`) so that any layer can
name what is wrong without importing a layer above it (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value a run cannot use.

    Always names the dotted key, the offending value and how to fix it, so a user reading only the
    last line of a crashed job knows which override to change.
    """

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key = key
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{key}={value!r}: {problem}. Fix: {fix}")


class DataError(ValueError):
    """A row a reader cannot use: where (file:line), which field, what is wrong, how to fix it.

    Never dropped silently: raised, or written to a rejects file.
    """

    def __init__(self, source: str, line: int | None, field: str | None, problem: str, fix: str = "") -> None:
        self.source, self.line, self.field, self.problem, self.fix = source, line, field, problem, fix
        where = f"{source}:{line}" if line is not None else source
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {problem}" + (f". Fix: {fix}" if fix else ""))

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


def require(condition: bool, key: str, value: Any, problem: str, fix: str) -> None:
    """Raise `ConfigError(key, value, problem, fix)` unless `condition` holds: the shape of every config check."""
    if not condition:
        raise ConfigError(key, value, problem, fix)


def require_distinct_output(output: str, input: str) -> None:
    """`output` must not be the file `input` names: a recipe that writes while it reads would destroy its data."""
    require(
        Path(output).resolve() != Path(input).resolve(),
        "output",
        output,
        "would overwrite the input",
        "choose another output path",
    )
