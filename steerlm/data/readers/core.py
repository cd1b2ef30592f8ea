"""One streaming API over every input format, with an explicit policy for bad rows.

`read_records` yields `Conversation`s row by row (memory stays flat on multi-GB files). A row that
cannot be used either stops the read with a DataError naming file:line and the field (the default),
or — with `BadRowPolicy.reject` — goes to a `RejectSink` file with its reason and is counted in
`ReadStats`. Rows are never dropped silently: the reject policy refuses to run without a sink.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from steerlm.data.attributes import AttributeSchema
from steerlm.data.jsonl import decode_line, iter_raw_lines, json_line, parse_json_object, sniff
from steerlm.data.readers.fields import RESERVED_KEYS
from steerlm.data.readers.helpsteer import conversations_from_helpsteer
from steerlm.data.readers.oasst import conversations_from_oasst_tree
from steerlm.data.readers.plain import conversations_from_plain
from steerlm.data.readers.regression import conversations_from_regression
from steerlm.data.records import Conversation, from_conversation_json, to_conversation_json
from steerlm.errors import DataError
from steerlm.files import AtomicTextFile

logger = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 1024
_E = TypeVar("_E", bound=Enum)
_Row = TypeVar("_Row")  # what a converter makes of one input row


class DataFormat(str, Enum):
    conversation = "conversation"  # NeMo-Aligner conversation JSONL
    helpsteer2 = "helpsteer2"  # HelpSteer2 rows; the prompt is one user turn (NeMo-Aligner's conversion)
    helpsteer2_turns = "helpsteer2_turns"  # HelpSteer2 rows; multi-turn prompts split into turns (history trained)
    helpsteer = "helpsteer"  # HelpSteer (v1) rows; the prompt is one user turn
    oasst = "oasst"  # OpenAssistant message trees, one conversation per leaf
    plain = "plain"  # {"prompt", "response", "attributes", "system"?}
    regression = "regression"  # NeMo-Aligner's regression reward-model rows {"text", "label": [floats]}

    @property
    def has_rating_columns(self) -> bool:
        """HelpSteer-style rows: ratings are columns, and the other columns pass through to `extra`."""
        return self in (DataFormat.helpsteer, DataFormat.helpsteer2, DataFormat.helpsteer2_turns)


class BadRowPolicy(str, Enum):
    error = "error"  # raise DataError at the first bad row
    reject = "reject"  # write it to the RejectSink, count it, go on


@dataclass
class ReadStats:
    """Counts of one read: every non-blank row is either converted (`rows_ok`) or rejected, none vanishes."""

    rows_in: int = 0  # non-blank lines (parquet: rows) read
    rows_out: int = 0  # Conversations yielded (an OASST tree yields one per leaf)
    rejected: int = 0  # rows sent to the RejectSink
    reasons: Counter[str] = field(default_factory=Counter)  # rejected rows per field (indices as [])
    blank_lines: int = 0  # whitespace-only lines, not rows
    rows_without_conversation: int = 0  # valid rows with nothing to train on (an unanswered OASST prompt)

    @property
    def rows_ok(self) -> int:
        return self.rows_in - self.rejected


class RejectSink:
    """Rejected rows as JSONL: {"source": "file:line", "field", "reason", "row"}; written atomically.

    `row` is the raw line text (parquet: the row as an object) so a fixed row can be pasted back. The
    file appears on a clean exit of the `with` block — empty when nothing was rejected — and not at all
    if the block raised.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._file = AtomicTextFile(self.path)

    def __enter__(self) -> RejectSink:
        self._file.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._file.__exit__(exc_type, exc, traceback)

    def write(self, error: DataError, row: object) -> None:
        reason = error.problem + (f". Fix: {error.fix}" if error.fix else "")
        record = {"source": error.location, "field": error.field, "reason": reason, "row": row}
        # default=str: a parquet row may hold values JSON cannot (bytes, dates); the reject must still be written
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.count += 1


Converter = Callable[[Mapping[str, object], AttributeSchema, str, int], list[_Row]]

_CONVERTERS: dict[DataFormat, Converter[Conversation]] = {
    DataFormat.conversation: lambda row, schema, source, line: [from_conversation_json(row, schema, source, line)],
    DataFormat.helpsteer2: partial(conversations_from_helpsteer, split_turns=False),
    DataFormat.helpsteer2_turns: partial(conversations_from_helpsteer, split_turns=True),
    DataFormat.helpsteer: partial(conversations_from_helpsteer, split_turns=False),
    DataFormat.oasst: conversations_from_oasst_tree,
    DataFormat.plain: conversations_from_plain,
    DataFormat.regression: conversations_from_regression,
}


@dataclass(frozen=True)
class InputRow(Generic[_Row]):
    """One non-blank input row as read (`raw`: the line's bytes, or a parquet row) and what it became (empty
    when it was rejected or holds nothing to train on)."""

    line: int
    raw: bytes | dict
    records: list[_Row]


def read_records(
    path: str | Path,
    fmt: DataFormat,
    schema: AttributeSchema,
    on_bad_row: BadRowPolicy = BadRowPolicy.error,
    rejects: RejectSink | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Conversation]:
    """Conversations from a JSONL (plain or gzip) or parquet file, streamed, each with source "file:line".

    The file type comes from its first bytes, not its name. Parquet rows are numbered from 1 like lines
    and need `pyarrow`. An empty file yields nothing. Arguments are checked now, the file when iterated.
    """
    return (record for row in read_rows(path, fmt, schema, on_bad_row, rejects, stats) for record in row.records)


def read_rows(
    path: str | Path,
    fmt: DataFormat,
    schema: AttributeSchema,
    on_bad_row: BadRowPolicy = BadRowPolicy.error,
    rejects: RejectSink | None = None,
    stats: ReadStats | None = None,
) -> Iterator[InputRow[Conversation]]:
    """`read_records` one input row at a time, with the row's raw content: for callers that must know which
    rows made which records (annotate fingerprints its resumable shards by the rows they were read from)."""
    fmt = _enum(DataFormat, fmt, "fmt")
    on_bad_row = _enum(BadRowPolicy, on_bad_row, "on_bad_row")
    if schema.left_out:
        logger.info(
            "%s: schema '%s' reads %s; ratings of %s (the rest of the known schemas it is part of) are not read",
            path,
            schema.name,
            ", ".join(schema.attributes),
            ", ".join(schema.left_out),
        )
    if on_bad_row == BadRowPolicy.reject and rejects is None:
        raise ValueError("on_bad_row='reject' needs a RejectSink, otherwise rejected rows would vanish")
    stats = ReadStats() if stats is None else stats
    return _read_rows(Path(path), _CONVERTERS[fmt], schema, on_bad_row, rejects, stats)


def _read(
    path: Path,
    convert: Converter[_Row],
    schema: AttributeSchema,
    on_bad_row: BadRowPolicy,
    rejects: RejectSink | None,
    stats: ReadStats,
) -> Iterator[_Row]:
    """The records of `_read_rows`, in order."""
    for row in _read_rows(path, convert, schema, on_bad_row, rejects, stats):
        yield from row.records


def _read_rows(
    path: Path,
    convert: Converter[_Row],
    schema: AttributeSchema,
    on_bad_row: BadRowPolicy,
    rejects: RejectSink | None,
    stats: ReadStats,
) -> Iterator[InputRow[_Row]]:
    source = str(path)
    rows = _parquet_rows(path) if sniff(path) == "parquet" else iter_raw_lines(path)
    for line, raw in rows:
        if isinstance(raw, bytes) and not raw.strip():
            stats.blank_lines += 1
            continue
        stats.rows_in += 1
        try:
            row = raw if isinstance(raw, dict) else parse_json_object(decode_line(raw, source, line), source, line)
            conversations = convert(row, schema, source, line)
        except DataError as error:
            if on_bad_row == BadRowPolicy.error or rejects is None:
                raise
            stats.rejected += 1
            stats.reasons[re.sub(r"\[\d+\]", "[]", error.field or "row")] += 1
            rejects.write(error, raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw)
            yield InputRow(line, raw, [])
            continue
        if not conversations:
            stats.rows_without_conversation += 1
        stats.rows_out += len(conversations)
        yield InputRow(line, raw, conversations)
    if stats.rejected:
        logger.warning(
            "%s: rejected %d of %d rows (%s) → %s",
            source,
            stats.rejected,
            stats.rows_in,
            ", ".join(f"{key}: {n}" for key, n in stats.reasons.most_common()),
            rejects.path if rejects else "-",
        )


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ImportError(
            f"{path} is a parquet file; reading parquet needs the 'pyarrow' package (pip install pyarrow)"
        ) from None
    number = 0
    try:
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError) as error:  # pyarrow's ArrowIOError / ArrowInvalid
        raise DataError(
            str(path), number + 1, None, f"cannot be read after row {number} ({error})", "check the file, copy it again"
        ) from None


def write_conversation_jsonl(records: Iterable[Conversation], path: str | Path, schema: AttributeSchema) -> int:
    """NeMo-Aligner conversation JSONL, atomically (tmp + os.replace); returns the rows written.

    UTF-8 with ensure_ascii=False, one object per line, keys in a fixed order: writing what
    `read_records` read gives the same bytes every time. Labels with names or values the schema
    rejects raise DataError instead of being left out of the attribute string.
    """
    path = Path(path)
    written = 0
    with AtomicTextFile(path) as file:
        for record in records:
            for index, turn in enumerate(record.turns):
                if turn.labels is not None:
                    schema.check(turn.labels, record.source or str(path), None, f"conversations[{index}].label")
            clash = RESERVED_KEYS & record.extra.keys()
            if clash:
                raise DataError(
                    record.source or str(path),
                    None,
                    sorted(clash)[0],
                    "an extra field shadows a conversation JSONL key",
                )
            file.write(json_line(to_conversation_json(record, schema)))
            written += 1
    return written


def _enum(kind: type[_E], value: object, name: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(m.value for m in kind)}") from None
