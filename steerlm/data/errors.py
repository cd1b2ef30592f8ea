"""The one error type for bad data: where (file:line), which field, what is wrong, how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """A row a reader cannot use. Never dropped silently: raised, or written to a rejects file."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str, fix: str = "") -> None:
        self.source, self.line, self.field, self.problem, self.fix = source, line, field, problem, fix
        where = f"{source}:{line}" if line is not None else source
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {problem}" + (f". Fix: {fix}" if fix else ""))

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source
