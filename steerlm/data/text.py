"""A byte-level text corpus with deterministic random windows: the demo's and tests' LM data."""

from __future__ import annotations

import math
from importlib import resources

import torch

BYTE_VOCAB = 256


def demo_text() -> bytes:
    """The corpus bundled with steerlm (plain English about SteerLM, ~4 KB)."""
    return resources.files("steerlm.data").joinpath("demo_corpus.txt").read_bytes()


class ByteCorpus:
    """Bytes as token ids (0-255); the last `valid_fraction` of the text is held out."""

    def __init__(self, text: bytes, valid_fraction: float = 0.1) -> None:
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(ids) * (1.0 - valid_fraction))
        self.splits = {"train": ids[:split], "valid": ids[split:]}

    def batch(self, split: str, index: int, rows: int, seq_length: int, seed: int) -> dict[str, torch.Tensor]:
        """Batch `index` of `rows` windows of `seq_length + 1` bytes; the same on every rank and rerun."""
        ids = self.splits[split]
        if len(ids) <= seq_length + 1:
            raise ValueError(f"the {split} split has {len(ids)} bytes, fewer than seq_length + 1 = {seq_length + 1}")
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
        """Cross entropy (nats/token) of the train split's byte frequencies on `split`: the bar to beat."""
        counts = torch.bincount(self.splits["train"], minlength=BYTE_VOCAB).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        return -log_probs[self.splits[split]].mean().item() if len(self.splits[split]) else math.nan
