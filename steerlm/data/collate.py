"""Tokenised examples → training batches: loss masks, length policy, dynamic padding, packing, buckets.

An example is the token ids of one rendered conversation and, per id, whether it is trained. Inputs
are ids[:-1], targets ids[1:] and the loss mask the targets' trainable flags, so a batch row of
`seq_length` positions needs `seq_length + 1` ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.data.nemo_chat import nemo_chat_ids
from steerlm.data.template import Segment, Tokenization

if TYPE_CHECKING:
    from steerlm.data.attributes import Labels
    from steerlm.data.records import Conversation, Turn
    from steerlm.data.template import SteerLMTemplate
    from steerlm.tokenizers.base import Tokenizer

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    trainable: tuple[bool, ...]
    source: str = ""

    @property
    def positions(self) -> int:
        """Input positions this example fills (one fewer than its ids)."""
        return len(self.ids) - 1


def encode_after(tokenizer: Tokenizer, before: str, text: str) -> list[int]:
    """The ids `text` gets where it follows `before` in one string, so decode(ids(before) + ids) reads as
    before + text.

    Encoding a segment on its own can differ from its ids in context: a SentencePiece tokenizer puts its
    word-start `▁` before every separately encoded text ("\\n Blue" where the string reads "\\nBlue"). So
    `text` is encoded after the tail of `before` (from its last newline) and that tail's ids are cut off. When
    a token spans the boundary (the tail's ids are not a prefix of the joined ids), `text` is encoded alone:
    its ids then still decode to `text` for tokenizers whose decoding is context-free (byte-level BPE).
    """
    if not before:
        return tokenizer.encode(text)
    tail = before[before.rfind("\n") :] if "\n" in before else before
    context = tokenizer.encode(tail)
    joined = tokenizer.encode(tail + text)
    if joined[: len(context)] == context:
        return joined[len(context) :]
    return tokenizer.encode(text)


def tokenize(
    segments: Sequence[Segment],
    tokenizer: Tokenizer,
    tokenization: Tokenization = Tokenization.markers,
    source: str = "",
) -> Example:
    """Ids and trained flags of `segments` (a prompt, or a prompt and a response).

    `markers`: BOS (when the tokenizer has one, never trained), then each segment encoded in context
    (`encode_after`), its flag on each of its ids. `nemo`: the joined text in one encode call, no BOS; segment k
    starts at the count of ids of the text before it — NeMo-Aligner's prompt/response rule (its SteerLM 2.0
    dataset masks the prompt's id count). Conversations for SFT go through `conversation_example`.
    """
    if tokenization == Tokenization.nemo:
        return _prefix_counted(segments, tokenizer, source)
    ids: list[int] = []
    trainable: list[bool] = []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        trainable.append(False)
    before = ""
    for segment in segments:
        encoded = encode_after(tokenizer, before, segment.text)
        ids.extend(encoded)
        trainable.extend([segment.trainable] * len(encoded))
        before += segment.text
    return Example(tuple(ids), tuple(trainable), source)


def _prefix_counted(segments: Sequence[Segment], tokenizer: Tokenizer, source: str) -> Example:
    text = "".join(segment.text for segment in segments)
    ids = tokenizer.encode(text)
    trainable: list[bool] = []
    before = ""
    for index, segment in enumerate(segments):
        before += segment.text
        end = len(ids) if index == len(segments) - 1 else min(len(tokenizer.encode(before)), len(ids))
        trainable.extend([segment.trainable] * max(0, end - len(trainable)))
    return Example(tuple(ids), tuple(trainable), source)


def conversation_example(template: SteerLMTemplate, conversation: Conversation, tokenizer: Tokenizer) -> Example:
    """The SFT example of `conversation` under the template's tokenization: `markers` tokenises its segments,
    `nemo` applies NeMo's chat-SFT rule (`steerlm.data.nemo_chat`)."""
    if template.config.tokenization == Tokenization.nemo:
        ids, trainable = nemo_chat_ids(template, conversation, tokenizer)
        return Example(tuple(ids), tuple(trainable), conversation.source)
    return tokenize(template.segments(conversation), tokenizer, Tokenization.markers, conversation.source)


def prompt_ids(
    template: SteerLMTemplate, tokenizer: Tokenizer, system: str, turns: Sequence[Turn], labels: Labels | None
) -> list[int]:
    """Token ids of the prompt asking for the next assistant turn with `labels`, tokenised as SFT tokenised the
    same prefix (the template's tokenization: BOS and segments in context, or NeMo's one encode call), so
    inference feeds exactly the ids the model was trained on."""
    segments = template.inference_segments(system, list(turns), labels)
    return list(tokenize(segments, tokenizer, template.config.tokenization).ids)


def apply_length_policy(
    examples: Iterable[Example], seq_length: int, policy: LengthPolicy, stats: LengthStats
) -> list[Example]:
    """Fit examples to `seq_length` input positions; every cut or drop is counted in `stats`."""
    kept = []
    for example in examples:
        stats.examples += 1
        if example.positions > seq_length:
            if policy == LengthPolicy.drop:
                stats.dropped["longer than seq_length"] += 1
                continue
            example = Example(example.ids[: seq_length + 1], example.trainable[: seq_length + 1], example.source)
            stats.truncated += 1
        if not any(example.trainable[1:]):
            stats.dropped["no trained token" + (" after truncation" if example.positions == seq_length else "")] += 1
            continue
        kept.append(example)
        stats.kept += 1
    return kept


def _row(example: Example) -> tuple[list[int], list[int], list[float]]:
    ids = list(example.ids)
    return ids[:-1], ids[1:], [1.0 if flag else 0.0 for flag in example.trainable[1:]]


def pad_batch(examples: Sequence[Example], pad_id: int, seq_length: int | None = None) -> Batch:
    """Right-padded batch (to the longest example, or to `seq_length`); padding is never trained."""
    length = seq_length or max(example.positions for example in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), length)
    for row, example in enumerate(examples):
        inputs, targets, mask = _row(example)
        n = len(inputs)
        tokens[row, :n], labels[row, :n], loss_mask[row, :n] = (
            torch.tensor(inputs),
            torch.tensor(targets),
            torch.tensor(mask),
        )
    positions = torch.arange(length).expand(len(examples), length).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}


def pack_examples(examples: Sequence[Example], seq_length: int) -> list[list[Example]]:
    """First-fit-decreasing bins of at most `seq_length` positions (order within a bin kept stable)."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].positions)
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = examples[index].positions
        if size > seq_length:
            raise ValueError(
                f"example {examples[index].source or index} has {size} positions > seq_length "
                f"{seq_length}; apply the length policy first"
            )
        slot = next((b for b, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([])
            room.append(seq_length)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= size
    return [[examples[i] for i in sorted(members)] for members in bins]


def packed_batch(rows: Sequence[Sequence[Example]], pad_id: int, seq_length: int) -> Batch:
    """Packed rows with per-document attention isolation.

    Each row concatenates its documents; `attention_mask` (`[b, 1, s, s]`, True = masked, megatron's
    convention) is block-diagonal causal, so no token sees another document, and position ids
    restart at 0 for every document (learned position embeddings use them; RoPE scores depend only
    on the distance between two tokens of the same document, which packing does not change).
    Trailing padding forms its own block (never trained), so no query row is fully masked.
    """
    tokens = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), seq_length)
    positions = torch.zeros(len(rows), seq_length, dtype=torch.long)
    document = torch.zeros(len(rows), seq_length, dtype=torch.long)
    for row, docs in enumerate(rows):
        start = 0
        for index, example in enumerate(docs):
            inputs, targets, mask = _row(example)
            end = start + len(inputs)
            tokens[row, start:end], labels[row, start:end] = torch.tensor(inputs), torch.tensor(targets)
            loss_mask[row, start:end] = torch.tensor(mask)
            positions[row, start:end] = torch.arange(len(inputs))
            document[row, start:end] = index
            start = end
        positions[row, start:] = torch.arange(seq_length - start)
        document[row, start:] = len(docs)
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    same_document = document.unsqueeze(2) == document.unsqueeze(1)
    attention_mask = ~(same_document & causal).unsqueeze(1)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": positions,
        "attention_mask": attention_mask,
    }


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), for inference and annotation.

    Every index appears exactly once; callers restore input order by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
