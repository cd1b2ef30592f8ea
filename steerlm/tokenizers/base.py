"""The tokenizer contract every stage codes against, and the SteerLM template's special tokens."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

# The SteerLM prompt template marks turns and the attribute line with these; each must be one token so
# that the template's layout (and the loss masks built from it) never depends on the surrounding text.
SPECIAL_TOKENS: tuple[str, ...] = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")


class Tokenizer(abc.ABC):
    """Text to token ids and back.

    Contract: `encode` never adds BOS/EOS (the caller builds sequences explicitly), and every
    occurrence of a `SPECIAL_TOKENS` string in the text becomes exactly that token's one id, even
    when glued to other text (an `HFTokenizer(markers=False)` keeps NeMo's plain-text markers
    instead). Ids lie in [0, vocab_size); the model's vocabulary must be at least `vocab_size` (it may
    be padded beyond it).
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (one more than the largest id)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The id that fills padded positions (always set: batching needs one)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the tokenizer has none."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included; ValueError for an id outside [0, vocab_size)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """The id of one vocabulary entry; KeyError naming the token when it is absent."""


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as plain ints, or ValueError naming the first one outside [0, vocab_size).

    A model whose vocabulary is padded past the tokenizer's can sample such ids; failing loudly is
    better than dropping them from the text.
    """
    values = [int(token_id) for token_id in ids]
    for position, token_id in enumerate(values):
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"token id {token_id} at position {position} is outside the tokenizer's vocabulary "
                f"[0, {vocab_size}); mask logits at or above vocab_size before sampling"
            )
    return values


def existing_directory(path: str | Path, fix: str) -> Path:
    """`path` as a Path if it is a directory, else FileNotFoundError naming it and `fix`."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist; {fix}")
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(directory)!r} is not a directory; {fix}")
    return directory
