"""The one error type for bad user configuration."""

from __future__ import annotations

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
