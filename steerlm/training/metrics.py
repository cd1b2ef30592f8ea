"""Run metrics: `metrics.jsonl` (one JSON object per logged step or evaluation) and TensorBoard.

Written by global rank 0 only. On resume, rows after the checkpoint's step are dropped first, so the
file of an interrupted-and-resumed run reads exactly like an uninterrupted one. A last line cut short by a
kill mid-write (no newline, not JSON) is dropped with a warning; a damaged line anywhere else is a DataError
naming file:line, since that is no interrupted write.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from steerlm.errors import DataError
from steerlm.files import atomic_write_text

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class LoggedStep:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    elapsed: float
    metrics: dict[str, float] = field(default_factory=dict)  # the task's other scalars (e.g. SteerLM 2.0's distance)


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS
        self._file: TextIO | None = None
        self._tensorboard: SummaryWriter | None = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(str(Path(output_dir) / TENSORBOARD), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                row = json.loads(line)
                row_step = row["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # the last line has no newline: a write cut short
                    log.warning("%s:%d: dropped a torn last line (a write cut short): %.80r", self.path, number, line)
                    continue
                raise DataError(
                    str(self.path), number, None, "is not a metrics row", "delete the line (or the file) and rerun"
                ) from None
            if row_step <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _writers(self) -> tuple[TextIO, SummaryWriter]:
        if self._file is None or self._tensorboard is None:
            raise RuntimeError(f"{self.path}: the metrics log was not opened (enabled=False)")
        return self._file, self._tensorboard

    def _write(self, row: dict) -> None:
        file, _ = self._writers()
        file.write(json.dumps(row) + "\n")
        file.flush()

    def log_train(self, logged: LoggedStep) -> None:
        if not self.enabled:
            return
        row = asdict(logged)
        row.update(row.pop("metrics"))
        self._write(row)
        _, tensorboard = self._writers()
        for name in ("loss", "lr", "grad_norm", "tokens_per_s", *logged.metrics):
            value = row[name]
            if value is not None:
                tensorboard.add_scalar(f"train/{name}", value, logged.step)

    def log_eval(self, step: int, loss: float, extra: dict[str, float] | None = None) -> None:
        """The validation loss and a stage's `extra` scalars: `val_<name>` in metrics.jsonl, `val/<name>` in
        TensorBoard."""
        if not self.enabled:
            return
        values = {"loss": loss, **(extra or {})}
        self._write({"step": step, **{f"val_{name}": value for name, value in values.items()}})
        _, tensorboard = self._writers()
        for name, value in values.items():
            tensorboard.add_scalar(f"val/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
