"""Hugging Face tokenizers loaded from a local directory, with the SteerLM special tokens ensured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steerlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer, check_token_ids, existing_directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_FIX = "pass a local directory holding tokenizer.json (fast) or tokenizer.model (sentencepiece)"


class HFTokenizer(Tokenizer):
    """A `transformers.AutoTokenizer` read from `path` only (never the Hub).

    With `markers` (the default), any of `SPECIAL_TOKENS` missing from the vocabulary is appended as a
    special token, which grows `vocab_size`; `added_tokens` names those so the caller can log it and size the
    model's vocabulary. Tokens already in the vocabulary keep their ids but are registered as special so they
    are never split inside text. With `markers=False` the tokenizer is used as stored: the markers are
    whatever it makes of their text (NeMo-Aligner's ids, `template.tokenization=nemo`), and the contract's
    one-id rule for them does not hold.
    """

    def __init__(self, path: str | Path, markers: bool = True) -> None:
        directory = existing_directory(path, _FIX)
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"tokenizer directory {str(directory)!r} holds none of {', '.join(TOKENIZER_FILES)}; {_FIX}"
            )
        try:
            from tokenizers import AddedToken
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError(
                f"HFTokenizer needs transformers ({error}); install it with pip install 'steerlm[hf]'"
            ) from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as error:  # transformers raises many types for unreadable files
            raise ValueError(f"could not load a tokenizer from {str(directory)!r}: {error}") from error

        self.added_tokens: tuple[str, ...] = ()
        if markers:
            self.added_tokens = tuple(t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab())
            registered = tokenizer.get_added_vocab()
            tokenizer.add_tokens(
                [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t not in registered],
                special_tokens=True,
            )
        self._tokenizer = tokenizer
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._vocab_size = max(len(tokenizer), max(self._vocab.values()) + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token, else its EOS, else `<extra_id_1>` when it is one id, else id 0 (padding is
        never attended to nor trained, so any id serves)."""
        for token_id in (self._tokenizer.pad_token_id, self._tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return self._vocab.get(SPECIAL_TOKENS[1], 0)

    @property
    def eos_id(self) -> int | None:
        return self._tokenizer.eos_token_id

    @property
    def bos_id(self) -> int | None:
        return self._tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        # verbose=False: corpus documents may exceed model_max_length; packing handles the length.
        return list(self._tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's own decoding, special tokens kept and no clean-up of spaces."""
        text = self._tokenizer.decode(
            check_token_ids(ids, self._vocab_size), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if not isinstance(text, str):  # transformers types decode as str | list[str]; one id list gives a str
            raise TypeError(f"the tokenizer decoded one id sequence to {type(text).__name__}, not str")
        return text

    def save_pretrained(self, directory: str | Path) -> None:
        """Write this tokenizer as `transformers` files, the SteerLM markers it added at load included."""
        self._tokenizer.save_pretrained(str(directory))

    def token_to_id(self, token: str) -> int:
        try:
            return self._vocab[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary ({self._vocab_size} ids)") from None
