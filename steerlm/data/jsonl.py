"""Low-level JSON Lines I/O: streamed raw lines (plain or gzip), strict per-line JSON (atomic writes: steerlm.files).

Readers need physical line numbers for their error messages, gzip transparency without trusting the
file name, and JSON parsing that refuses what `json.loads` would quietly accept (a duplicate key keeps
only its last value — a silent rewrite). Writers need output that appears whole or not at all, so an
interrupted run never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from steerlm.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
_BOM = "\ufeff"


def sniff(path: str | Path) -> str:
    """'gzip', 'parquet' or 'text', from the file's first bytes (the name may lie, e.g. HF caches)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise DataError(str(path), None, None, f"cannot be read ({error.strerror or error})") from None
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == PARQUET_MAGIC:
        return "parquet"
    return "text"


def open_binary(path: str | Path) -> BinaryIO:
    """The file's bytes, gunzipped when it is gzip-compressed."""
    if sniff(path) == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_raw_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without its line ending), streamed; blank lines included.

    Lines are split on b"\\n" only, so U+2028 and other Unicode separators inside a JSON string never
    cut a row in two; a trailing "\\r" (Windows line ending) is removed. A file that cannot be read to its
    end (a truncated or corrupt gzip stream, an I/O error) raises DataError naming the file and the first
    line it could not read, whatever the bad-row policy: the rest of the file is unknown, not one bad row.
    """
    number = 0
    try:
        with open_binary(path) as file:
            for number, raw in enumerate(file, start=1):
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                yield number, raw
    except EOFError:
        raise DataError(
            str(path),
            number + 1,
            None,
            f"the compressed data ends early: the file is truncated after line {number}",
            "copy or download the file again (gzip -t checks it)",
        ) from None
    except (OSError, zlib.error) as error:
        raise DataError(
            str(path),
            number + 1,
            None,
            f"cannot be read after line {number} ({getattr(error, 'strerror', None) or error})",
            "check the file (gzip -t for a .gz) and copy it again",
        ) from None


def decode_line(raw: bytes, source: str, line: int) -> str:
    """UTF-8 text of one line (a byte-order mark on line 1 is not data and is dropped)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            source, line, None, f"not valid UTF-8 at byte {error.start}", "re-encode the file as UTF-8"
        ) from None
    return text[1:] if line == 1 and text.startswith(_BOM) else text


class _DuplicateKey(Exception):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json_object(text: str, source: str, line: int) -> dict:
    """One JSON object; bad JSON, duplicate keys and non-objects raise DataError naming file:line."""
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as error:
        raise DataError(source, line, str(error), "key appears twice in the object", "keep one value per key") from None
    except json.JSONDecodeError as error:
        raise DataError(
            source,
            line,
            None,
            f"not valid JSON ({error.msg} at column {error.colno})",
            "write one JSON object per line",
        ) from None
    if not isinstance(value, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(value).__name__}")
    return value


def json_line(obj: object) -> str:
    """One JSONL line as NeMo-Aligner writes them: text kept as is (ensure_ascii=False), no NaN/Infinity."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
