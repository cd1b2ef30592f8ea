"""Tokenizers: one `Tokenizer` interface over Hugging Face tokenizers and the bundled word tokenizer."""

from __future__ import annotations

import enum
from pathlib import Path

from steerlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from steerlm.tokenizers.hf import HFTokenizer
from steerlm.tokenizers.word import VOCAB_FILE, WordTokenizer, normalize

__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_FILE",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerKind",
    "WordTokenizer",
    "load_tokenizer",
    "normalize",
]


class TokenizerKind(str, enum.Enum):
    """Which implementation `load_tokenizer` builds."""

    HF = "hf"  # a Hugging Face tokenizer directory (tokenizer.json or tokenizer.model)
    WORD = "word"  # a directory holding word_vocab.json


def load_tokenizer(kind: str | TokenizerKind, path: str | Path | None, markers: bool = True) -> Tokenizer:
    """The tokenizer of `kind` stored in the local directory `path`; `markers=False` keeps `<extra_id_0/1/2>`
    plain text (`HFTokenizer`), which the word tokenizer cannot.

    ValueError for an unknown kind, a missing path or a word tokenizer without markers, FileNotFoundError for
    a directory that is absent or lacks the kind's files; each message names the path and the fix.
    """
    try:
        kind = TokenizerKind(kind)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in TokenizerKind)
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {choices}") from None
    if path is None:
        expected = "tokenizer.json or tokenizer.model" if kind is TokenizerKind.HF else VOCAB_FILE
        raise ValueError(f"tokenizer kind {kind.value!r} needs a path: the local directory holding {expected}")
    if kind is TokenizerKind.HF:
        return HFTokenizer(path, markers)
    if not markers:
        raise ValueError(
            f"the word tokenizer in {str(path)!r} holds <extra_id_0/1/2> as single ids only; "
            "NeMo's plain-text markers (template.tokenization=nemo) need an HF tokenizer"
        )
    return WordTokenizer.load(path)
