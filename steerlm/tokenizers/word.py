"""The bundled word-level tokenizer: a small closed vocabulary for the built-in synthetic dataset.

Text is cut into pieces — words (letters, digits, apostrophes, hyphens), single punctuation
characters and "\\n" — and spaces are never tokens of their own. A single space before a piece is
folded into that piece's token instead (" word" vs "word", as GPT-2 does with "Ġ"), so every word and
punctuation character has a glued and a spaced form. That makes decoding plain concatenation and
`decode(encode(t)) == normalize(t)` exact for any text whose pieces are in the vocabulary, including
the SteerLM attribute line ("<extra_id_2>helpfulness:4,verbosity:1").
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from steerlm.files import atomic_write_text
from steerlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer, check_token_ids, existing_directory

VOCAB_FILE = "word_vocab.json"
FORMAT = "steerlm-word-tokenizer-v1"
RESERVED_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", *SPECIAL_TOKENS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Pieces that normalize() never lets a space precede, so they have only a glued form.
ATTACHED_PIECES = frozenset(",.;:!?\n")
# Always in the vocabulary, so ASCII punctuation never becomes <unk>.
BASE_PIECES: tuple[str, ...] = ("\n", *string.punctuation)

_SPECIAL = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
_WORD = r"(?:[^\W_]|['’-])+"
_PIECE = re.compile(rf"{_SPECIAL}|{_WORD}|\n|\S")
_TOKEN = re.compile(rf" ?(?:{_SPECIAL}|{_WORD}|\n|\S)")
_BLANKS = re.compile(r"[^\S\n]+")
_SPACE_AT_LINE_EDGE = re.compile(r" ?\n ?")
_SPACE_BEFORE_ATTACHED = re.compile(rf" (?=[,.;:!?]|{_SPECIAL})")
_FIX = "build one with WordTokenizer.build(texts).save(directory)"


def normalize(text: str) -> str:
    """The canonical spacing of `text`, which is what `decode(encode(text))` returns.

    Every whitespace character except "\\n" becomes a space, runs of spaces collapse to one, spaces
    at the start and end of every line are dropped, and so is a space before , . ; : ! ? or a
    special token. Idempotent.
    """
    text = _BLANKS.sub(" ", text)
    text = _SPACE_AT_LINE_EDGE.sub("\n", text).strip(" ")
    return _SPACE_BEFORE_ATTACHED.sub("", text)


class WordTokenizer(Tokenizer):
    """Ids 0-6 are `RESERVED_TOKENS` (<pad>, <unk>, <s>, </s>, then `SPECIAL_TOKENS`); the rest are
    pieces in their glued and spaced forms. Pieces outside the vocabulary encode to <unk>, which
    decodes to "<unk>" (a space before the unknown piece is lost)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = tuple(tokens)
        if tokens[: len(RESERVED_TOKENS)] != RESERVED_TOKENS:
            raise ValueError(
                f"a word vocabulary starts with {list(RESERVED_TOKENS)}, "
                f"got {list(tokens[: len(RESERVED_TOKENS)])}; {_FIX}"
            )
        ids: dict[str, int] = {}
        for token_id, token in enumerate(tokens):
            if not isinstance(token, str) or (token_id >= len(RESERVED_TOKENS) and not _TOKEN.fullmatch(token)):
                raise ValueError(f"{token!r} (id {token_id}) is not one piece with at most one leading space; {_FIX}")
            if token in ids:
                raise ValueError(
                    f"token {token!r} appears twice in the word vocabulary (ids {ids[token]} and {token_id}); {_FIX}"
                )
            ids[token] = token_id
        self._tokens = tokens
        self._ids = ids

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """A vocabulary of every piece seen at least `min_count` times (spaced or not), most frequent
        first (ties alphabetical, so a rebuild from the same texts gives the same ids)."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(piece for text in texts for piece in _PIECE.findall(normalize(text)))
        excluded = set(BASE_PIECES) | set(SPECIAL_TOKENS)
        words = sorted(
            (piece for piece, count in counts.items() if count >= min_count and piece not in excluded),
            key=lambda piece: (-counts[piece], piece),
        )
        tokens = list(RESERVED_TOKENS)
        for piece in (*BASE_PIECES, *words):
            tokens.append(piece)
            if piece not in ATTACHED_PIECES:
                tokens.append(" " + piece)
        return cls(tokens)

    def save(self, directory: str | Path) -> Path:
        """Write `directory/word_vocab.json` atomically; returns its path."""
        payload = json.dumps({"format": FORMAT, "tokens": list(self._tokens)}, ensure_ascii=False, indent=1)
        return atomic_write_text(Path(directory).expanduser() / VOCAB_FILE, payload + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> WordTokenizer:
        """The tokenizer saved in `directory`; FileNotFoundError or ValueError naming the file and fix."""
        file = existing_directory(directory, f"pass the directory holding {VOCAB_FILE}, or {_FIX}") / VOCAB_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{str(file)!r} does not exist; {_FIX}")
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(file)!r} is not valid UTF-8 JSON ({error}); {_FIX}") from error
        valid = (
            isinstance(payload, dict) and payload.get("format") == FORMAT and isinstance(payload.get("tokens"), list)
        )
        if not valid:
            raise ValueError(f"{str(file)!r} is not a {FORMAT} file (expected keys 'format' and 'tokens'); {_FIX}")
        try:
            return cls(payload["tokens"])
        except ValueError as error:
            raise ValueError(f"{str(file)!r}: {error}") from error

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(token, UNK_ID) for token in _TOKEN.findall(normalize(text))]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._tokens[token_id] for token_id in check_token_ids(ids, len(self._tokens)))

    def token_to_id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(
                f"token {token!r} is not in the word vocabulary ({len(self._tokens)} tokens); "
                "spaced forms are written with their space, e.g. ' word'"
            ) from None

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a `tokenizers.Tokenizer` (WordLevel) that gives `encode`'s ids for any text.

        `normalize` becomes a normalizer (the same four rewrites), the piece pattern a pre-tokenizer, and the
        reserved tokens special added tokens matched after normalisation (so the normalizer sees the whole
        text, as `normalize` does). Python's Unicode classes (`\\s`, letters and digits) are spelled out as
        code-point ranges, because the Oniguruma engine `tokenizers` runs classifies some characters
        differently. One exception: the text `<pad>`, `<unk>`, `<s>` or `</s>` becomes that reserved token's id
        here (they are the exported tokenizer's special tokens) while `encode` spells it out in pieces.
        """
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizerObject
        from tokenizers.models import WordLevel

        blank = _oniguruma_class(_is_blank)
        word = rf"(?:{_oniguruma_class(str.isalnum)}|['’-])+"
        piece = rf" ?(?:{_SPECIAL}|{word}|\n|{_oniguruma_class(str.isspace, negate=True)})"
        tokenizer = HFTokenizerObject(WordLevel(dict(self._ids), unk_token=RESERVED_TOKENS[UNK_ID]))
        tokenizer.normalizer = normalizers.Sequence(
            [
                normalizers.Replace(Regex(f"{blank}+"), " "),
                normalizers.Replace(Regex(_SPACE_AT_LINE_EDGE.pattern), "\n"),
                normalizers.Replace(Regex(r"\A +| +\z"), ""),
                normalizers.Replace(Regex(_SPACE_BEFORE_ATTACHED.pattern), ""),
            ]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(piece), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=True) for token in RESERVED_TOKENS])
        return tokenizer


def _is_blank(character: str) -> bool:
    return character.isspace() and character != "\n"


@cache
def _oniguruma_class(member: Callable[[str], bool], negate: bool = False) -> str:
    """A regex character class (Oniguruma syntax) of the code points `member` accepts, as ranges."""
    ranges, start = [], None
    for point in range(0x110001):
        inside = point <= 0x10FFFF and member(chr(point))
        if inside and start is None:
            start = point
        elif not inside and start is not None:
            ranges.append(f"\\x{{{start:X}}}" + (f"-\\x{{{point - 1:X}}}" if point - 1 > start else ""))
            start = None
    return f"[{'^' if negate else ''}{''.join(ranges)}]"
