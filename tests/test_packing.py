"""Batching: the length policy counts what it cuts, buckets cover every row once, and a packed batch
gives the same per-token loss as the unpadded examples (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch

from steerlm.config import PrecisionConfig
from steerlm.data.collate import (
    Example,
    LengthPolicy,
    LengthStats,
    apply_length_policy,
    length_buckets,
    pack_examples,
    packed_batch,
    pad_batch,
)
from steerlm.models import build_model_chunks
from steerlm.training import forward_backward, wrap_for_training
from tests.conftest import TEST_MODEL

MODEL = TEST_MODEL
LENGTHS = (8, 13, 6, 21, 10, 17, 4)
SEQ = 32


def _examples() -> list[Example]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for index, length in enumerate(LENGTHS):
        ids = torch.randint(1, MODEL.vocab_size, (length + 1,), generator=generator).tolist()
        trainable = (torch.rand(length + 1, generator=generator) > 0.3).tolist()
        trainable[-1] = True
        out.append(Example(tuple(ids), tuple(bool(t) for t in trainable), f"doc{index}"))
    return out


@pytest.fixture(scope="module")
def model(layout):
    return build_model_chunks(MODEL, PrecisionConfig(), layout, seed=3)[0].eval(), layout


def _trained_losses(per_token: torch.Tensor, batch: dict, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per-example losses at trained positions; spans are (row, start, end)."""
    return [per_token[row, start:end][batch["loss_mask"][row, start:end] > 0] for row, start, end in spans]


def test_packed_batch_gives_the_unpacked_per_token_loss(model) -> None:
    chunk, _ = model
    examples = _examples()
    unpacked = pad_batch(examples, pad_id=0)
    with torch.no_grad():
        reference = chunk(unpacked["tokens"], unpacked["position_ids"], None, labels=unpacked["labels"])
    expected = _trained_losses(reference, unpacked, [(i, 0, e.positions) for i, e in enumerate(examples)])

    rows = pack_examples(examples, SEQ)
    assert len(rows) < len(examples)  # packing really packs
    packed = packed_batch(rows, pad_id=0, seq_length=SEQ)
    with torch.no_grad():
        per_token = chunk(packed["tokens"], packed["position_ids"], packed["attention_mask"], labels=packed["labels"])
    spans, order = [], []
    for row, docs in enumerate(rows):
        start = 0
        for doc in docs:
            spans.append((row, start, start + doc.positions))
            order.append(examples.index(doc))
            start += doc.positions
    got = _trained_losses(per_token, packed, spans)
    for index, losses in zip(order, got):
        torch.testing.assert_close(losses, expected[index], rtol=1e-5, atol=1e-5)
    assert sum(len(x) for x in got) == int(unpacked["loss_mask"].sum())


def test_training_step_sees_the_same_loss_packed_and_padded(model) -> None:
    chunk, layout = model
    wrapped = wrap_for_training([chunk], PrecisionConfig(), False, layout)
    examples = _examples()
    padded_loss, padded_tokens = forward_backward(wrapped, [pad_batch(examples, pad_id=0)], layout, forward_only=True)
    packed = packed_batch(pack_examples(examples, SEQ), pad_id=0, seq_length=SEQ)
    packed_loss, packed_tokens = forward_backward(wrapped, [packed], layout, forward_only=True)
    assert packed_tokens == padded_tokens
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)


def test_packed_rows_isolate_documents_and_restart_positions() -> None:
    rows = pack_examples(_examples(), SEQ)
    assert sorted(e.source for row in rows for e in row) == sorted(e.source for e in _examples())
    assert all(sum(e.positions for e in row) <= SEQ for row in rows)
    batch = packed_batch(rows, pad_id=0, seq_length=SEQ)
    first, second = rows[0][0], rows[0][1]
    mask = batch["attention_mask"][0, 0]
    a, b = first.positions, first.positions + second.positions
    assert not mask[a:b, a:b].tril().any() and mask[a:b, :a].all()  # second doc sees itself only, causally
    assert batch["position_ids"][0, a].item() == 0
    assert not mask.diagonal().any()  # every query sees at least itself (no NaN rows)


def test_length_policy_counts_truncated_and_dropped_examples() -> None:
    examples = _examples() + [Example((1, 2, 3), (False, False, False), "untrained")]
    stats = LengthStats()
    kept = apply_length_policy(examples, 12, LengthPolicy.truncate, stats)
    assert [e.positions for e in kept] == [8, 12, 6, 12, 10, 12, 4]
    assert (stats.examples, stats.kept, stats.truncated) == (8, 7, 3)
    assert stats.dropped == {"no trained token": 1}
    dropped = LengthStats()
    kept = apply_length_policy(examples, 12, LengthPolicy.drop, dropped)
    assert [e.positions for e in kept] == [8, 6, 10, 4]
    assert dropped.dropped == {"longer than seq_length": 3, "no trained token": 1}
    assert "4 kept" in dropped.summary()


def test_length_buckets_cover_every_index_once_longest_first() -> None:
    buckets = length_buckets(LENGTHS, 3)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(LENGTHS)))
    assert [len(b) for b in buckets] == [3, 3, 1]
    assert [LENGTHS[i] for i in buckets[0]] == [21, 17, 13]


def test_each_micro_batch_computes_only_up_to_its_own_longest_row_and_the_loss_stays(model) -> None:
    from steerlm.training.batching import microbatches_for_rank, trim_padding

    chunk, layout = model
    examples = _examples()
    batch = pad_batch(examples, pad_id=0, seq_length=SEQ)  # a global batch padded past its longest row
    [whole] = microbatches_for_rank(batch, len(examples), layout)
    assert whole["tokens"].shape[1] == max(e.positions for e in examples) == 21
    parts = microbatches_for_rank(pad_batch(examples[:6], pad_id=0, seq_length=SEQ), 2, layout)
    assert [p["tokens"].shape[1] for p in parts] == [13, 21, 17]  # rows (8, 13), (6, 21), (10, 17)
    assert trim_padding(batch, multiple=4)["tokens"].shape[1] == 24
    assert trim_padding({**batch, "loss_mask": torch.zeros_like(batch["loss_mask"])})["tokens"].shape[1] == 1
    scores = {"tokens": batch["tokens"], "position_ids": batch["position_ids"], "score_index": torch.tensor([4, 9])}
    assert trim_padding(scores)["tokens"].shape[1] == 10  # a regression APM reads up to its score index
    wrapped = wrap_for_training([chunk], PrecisionConfig(), False, layout)
    full_loss, full_tokens = forward_backward(wrapped, [batch], layout, forward_only=True)
    single_rows = microbatches_for_rank(batch, 1, layout)
    parts_loss, parts_tokens = forward_backward(wrapped, single_rows, layout, forward_only=True)
    assert (parts_tokens, parts_loss) == (full_tokens, pytest.approx(full_loss, rel=1e-6))


def test_length_sorted_order_gives_each_rank_alike_micro_batches() -> None:
    from steerlm.training.batching import length_sorted_order

    lengths = [5, 40, 12, 33, 7, 28, 19, 2]
    order = length_sorted_order(lengths, micro_batch_size=2, dp=2)
    assert sorted(order) == list(range(8))
    # rank 0 holds rows 0-3 (micro-batches 0, 1), rank 1 rows 4-7; micro-batch k of rank r = sorted chunk 2k + r
    assert [lengths[i] for i in order] == [40, 33, 12, 7, 28, 19, 5, 2]
