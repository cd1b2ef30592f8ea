"""Plain-text language-model data: a stream of token ids with deterministic random windows.

Two sources share one `TokenCorpus`: the bundled demo text as bytes (ids 0-255, the smoke demo's data), and a
JSONL file of documents (`{"text": …}`) tokenised and joined with BOS/EOS (the base LM's pretraining corpus).
A window's position in the stream depends only on (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from steerlm.data.jsonl import decode_line, iter_raw_lines, parse_json_object
from steerlm.data.sampler import held_out
from steerlm.errors import DataError
from steerlm.tokenizers.base import Tokenizer

BYTE_VOCAB = 256


def demo_text() -> bytes:
    """The corpus bundled with steerlm (plain English about SteerLM, ~4 KB)."""
    return resources.files("steerlm.data").joinpath("demo_corpus.txt").read_bytes()


def read_documents(path: str | Path, key: str = "text") -> Iterator[tuple[str, str]]:
    """(source `file:line`, text) of every row of a JSONL file of documents; DataError naming file:line for a
    row without a string `key`."""
    for line, raw in iter_raw_lines(path):
        row = parse_json_object(decode_line(raw, str(path), line), str(path), line)
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(str(path), line, key, "missing or empty text", f'give each row a non-empty "{key}"')
        yield f"{path}:{line}", text


class TokenCorpus:
    """A train and a validation stream of token ids; `batch` cuts random windows from one of them."""

    def __init__(self, train: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> None:
        self.splits = {"train": train.long(), "valid": valid.long()}
        self.vocab_size = vocab_size

    @classmethod
    def from_bytes(cls, text: bytes, valid_fraction: float = 0.1) -> TokenCorpus:
        """Bytes as token ids (0-255); the last `valid_fraction` of the text is held out."""
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(ids) * (1.0 - valid_fraction))
        return cls(ids[:split], ids[split:], BYTE_VOCAB)

    @classmethod
    def from_jsonl(
        cls, path: str | Path, tokenizer: Tokenizer, valid_fraction: float, key: str = "text"
    ) -> TokenCorpus:
        """Every document as BOS + ids + EOS (where the tokenizer has them), documents held out by a hash of
        their file:line (`steerlm.data.sampler.held_out`), each split concatenated in file order."""
        streams: dict[bool, list[int]] = {False: [], True: []}
        for source, text in read_documents(path, key):
            ids = tokenizer.encode(text)
            if tokenizer.bos_id is not None:
                ids = [tokenizer.bos_id, *ids]
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            streams[held_out(source, valid_fraction)].extend(ids)
        return cls(torch.tensor(streams[False]), torch.tensor(streams[True]), tokenizer.vocab_size)

    def tokens(self, split: str) -> int:
        return len(self.splits[split])

    def batch(self, split: str, index: int, rows: int, seq_length: int, seed: int) -> dict[str, torch.Tensor]:
        """Batch `index` of `rows` windows of `seq_length + 1` ids; the same on every rank and rerun."""
        ids = self.splits[split]
        if len(ids) <= seq_length + 1:
            raise ValueError(f"the {split} split has {len(ids)} tokens, fewer than seq_length + 1 = {seq_length + 1}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 2 + (split == "valid"))
        starts = torch.randint(0, len(ids) - seq_length - 1, (rows,), generator=generator)
        windows = torch.stack([ids[start : start + seq_length + 1] for start in starts.tolist()])
        return {
            "tokens": windows[:, :-1].contiguous(),
            "labels": windows[:, 1:].contiguous(),
            "loss_mask": torch.ones(rows, seq_length),
            "position_ids": torch.arange(seq_length).expand(rows, seq_length).contiguous(),
        }

    def unigram_entropy(self, split: str = "valid") -> float:
        """Cross entropy (nats/token) of the train split's add-one-smoothed token frequencies on `split`: the bar
        a model that ignores context can reach."""
        counts = torch.bincount(self.splits["train"], minlength=self.vocab_size).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        return -log_probs[self.splits[split]].mean().item() if len(self.splits[split]) else math.nan
