"""What happens to an example longer than `trainer.seq_length`, and the counts a data stage logs about it.

Torch-free, so that `steerlm.config` (which names `LengthPolicy`) and the launchers, which compose and validate
configs on a login node, import no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class LengthPolicy(str, Enum):
    truncate = "truncate"  # keep the first seq_length + 1 ids
    drop = "drop"  # leave the example out (counted)


@dataclass
class LengthStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason → count

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items()) or "none"
        return f"{self.examples} examples, {self.kept} kept ({self.truncated} truncated), dropped: {dropped}"
