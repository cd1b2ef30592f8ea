"""Attribute-model examples: the text an APM reads and the targets it regresses to.

One example per labelled assistant turn: the conversation up to that turn without attribute lines,
ending with the label prefix (`SteerLMTemplate.attribute_prompt`); targets in schema order with
MISSING (-100) for absent labels. Too-long examples keep their end (the rated response) or are
dropped, per the length policy, and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import LengthPolicy, LengthStats
from steerlm.data.records import Conversation, Role
from steerlm.data.template import SteerLMTemplate
from steerlm.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class AttributeExample:
    ids: tuple[int, ...]
    targets: tuple[float, ...]
    source: str = ""


def attribute_examples(conversations: Iterable[Conversation], schema: AttributeSchema, template: SteerLMTemplate,
                       tokenizer: Tokenizer, seq_length: int, policy: LengthPolicy, stats: LengthStats,
                       labelled_only: bool = True) -> list[AttributeExample]:
    """Examples for every labelled assistant turn (every last assistant turn when not `labelled_only`)."""
    examples = []
    for conversation in conversations:
        turns = list(conversation.turns)
        for index, turn in enumerate(turns):
            if turn.role != Role.assistant or (labelled_only and turn.labels is None) or \
                    (not labelled_only and index != len(turns) - 1):
                continue
            ids = tokenizer.encode(template.attribute_prompt(conversation.system, turns[:index + 1]))
            if tokenizer.bos_id is not None:
                ids = [tokenizer.bos_id] + ids
            stats.examples += 1
            if len(ids) > seq_length:
                if policy == LengthPolicy.drop:
                    stats.dropped["longer than seq_length"] += 1
                    continue
                ids = ids[-seq_length:]  # keep the rated response and the prefix the scores are read at
                stats.truncated += 1
            stats.kept += 1
            examples.append(AttributeExample(tuple(ids), tuple(schema.targets(turn.labels or {})),
                                             conversation.source))
    return examples


def attribute_batch(examples: Sequence[AttributeExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tokens, the index of each row's last token (`score_index`) and `targets`."""
    length = max(len(example.ids) for example in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens[row, :len(example.ids)] = torch.tensor(example.ids)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(length).expand(len(examples), length).contiguous(),
        "score_index": torch.tensor([len(example.ids) - 1 for example in examples]),
        "targets": torch.tensor([example.targets for example in examples], dtype=torch.float32),
    }
