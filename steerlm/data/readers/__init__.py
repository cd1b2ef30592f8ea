"""Dataset readers and the conversation JSONL writer (see docs/data_formats.md).

from steerlm.data.readers import DataFormat, read_records, write_conversation_jsonl
for conversation in read_records("train.jsonl.gz", DataFormat.helpsteer2, schema): ...
"""

from steerlm.data.readers.core import (
    BadRowPolicy,
    DataFormat,
    InputRow,
    ReadStats,
    RejectSink,
    read_records,
    read_rows,
    write_conversation_jsonl,
)
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.data.readers.helpsteer import HELPSTEER_ATTRIBUTES, split_helpsteer2_prompt
from steerlm.data.readers.oasst import OASST_LABELS, oasst_label_names, unschema_ratings

__all__ = [
    "BadRowPolicy",
    "DataFormat",
    "InputRow",
    "ReadStats",
    "RejectSink",
    "read_records",
    "read_rows",
    "write_conversation_jsonl",
    "DEFAULT_SYSTEM_PROMPT",
    "HELPSTEER_ATTRIBUTES",
    "split_helpsteer2_prompt",
    "OASST_LABELS",
    "oasst_label_names",
    "unschema_ratings",
]
