"""Attribute-model examples: the text an APM reads and the targets it regresses to (or, for the generative
APM, the attribute string it learns to write after that text).

One example per selected assistant turn (training and evaluation: every labelled one; scoring: the last;
annotation: those missing labels): the conversation up to that turn without attribute lines,
ending with the label prefix (`SteerLMTemplate.attribute_prompt`); targets in schema order with
MISSING (-100) for absent labels. Too-long examples keep their end (the rated response) or are
dropped, per the length policy, and are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.collate import Example, encode_after
from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.data.records import Conversation, Role
from steerlm.data.template import SteerLMTemplate, Tokenization
from steerlm.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class AttributeExample:
    ids: tuple[int, ...]
    targets: tuple[float, ...]
    source: str = ""
    turn: tuple[int, int] = (0, 0)  # (index of the conversation in the input, index of the rated turn in it)


TurnSelector = Callable[[Conversation, int], bool]


def labelled_turns(conversation: Conversation, index: int) -> bool:
    """Training and evaluation: every assistant turn with at least one label value (some may be missing; an
    empty attribute line, as OASST's unrated answers have, gives no target, as in NeMo-Aligner's regression data)."""
    turn = conversation.turns[index]
    return turn.role == Role.assistant and turn.labels is not None and any(v is not None for v in turn.labels.values())


def last_assistant_turn(conversation: Conversation, index: int) -> bool:
    """Scoring a response: the conversation's last assistant turn."""
    return index == max(i for i, turn in enumerate(conversation.turns) if turn.role == Role.assistant)


def attribute_examples(
    conversations: Iterable[Conversation],
    schema: AttributeSchema,
    template: SteerLMTemplate,
    tokenizer: Tokenizer,
    seq_length: int,
    policy: LengthPolicy,
    stats: LengthStats,
    select: TurnSelector = labelled_turns,
) -> list[AttributeExample]:
    """One example per assistant turn that `select` picks (by default every labelled one).

    The one tokenisation of APM inputs: training, evaluation, annotation and `AttributeScorer` all call it.
    The text is encoded in one call; BOS comes first under `markers` tokenization, never under `nemo`
    (NeMo-Aligner's regression reward model reads `tokenizer.text_to_ids(text)`).
    """
    bos = tokenizer.bos_id if template.config.tokenization == Tokenization.markers else None
    examples = []
    for position, conversation in enumerate(conversations):
        turns = list(conversation.turns)
        for index, turn in enumerate(turns):
            if turn.role != Role.assistant or not select(conversation, index):
                continue
            ids = tokenizer.encode(template.attribute_prompt(conversation.system, turns[: index + 1]))
            if bos is not None:
                ids = [bos] + ids
            stats.examples += 1
            if len(ids) > seq_length:
                if policy == LengthPolicy.drop:
                    stats.dropped["longer than seq_length"] += 1
                    continue
                ids = ids[-seq_length:]  # keep the rated response and the prefix the scores are read at
                stats.truncated += 1
            stats.kept += 1
            examples.append(
                AttributeExample(
                    tuple(ids), tuple(schema.targets(turn.labels or {})), conversation.source, (position, index)
                )
            )
    return examples


def attribute_batch(examples: Sequence[AttributeExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tokens, the index of each row's last token (`score_index`) and `targets`."""
    length = max(len(example.ids) for example in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens[row, : len(example.ids)] = torch.tensor(example.ids)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(length).expand(len(examples), length).contiguous(),
        "score_index": torch.tensor([len(example.ids) - 1 for example in examples]),
        "targets": torch.tensor([example.targets for example in examples], dtype=torch.float32),
    }


def attribute_string(schema: AttributeSchema, targets: Sequence[float], suffix: str) -> str:
    """What the generative APM writes after the label prefix: the labelled values (schema order) + `suffix`."""
    labels = {name: value for name, value in zip(schema.attributes, targets) if value != MISSING}
    return schema.format(labels) + suffix


def attribute_string_ids(
    schema: AttributeSchema, tokenizer: Tokenizer, template: SteerLMTemplate, targets
) -> list[int]:
    """The ids of `attribute_string` as they follow the APM prompt's label prefix (`encode_after`)."""
    text = attribute_string(schema, targets, template.config.turn_suffix)
    return encode_after(tokenizer, template.config.label_prefix, text)


def attribute_string_budget(schema: AttributeSchema, tokenizer: Tokenizer, template: SteerLMTemplate) -> int:
    """Tokens the longest attribute string takes (every attribute present, at its widest value): what a
    generative example adds to its prompt, and how many tokens scoring lets the model generate."""
    widths = {schema.min_value, schema.max_value, (schema.min_value + schema.max_value) / 2}
    if not schema.integer:
        widths.add(schema.max_value - 0.123456)
    return max(
        len(attribute_string_ids(schema, tokenizer, template, [value] * len(schema.attributes))) for value in widths
    )


def generative_examples(
    examples: Sequence[AttributeExample], schema: AttributeSchema, tokenizer: Tokenizer, template: SteerLMTemplate
) -> list[Example]:
    """Language-model examples of the generative APM: the APM prompt (not trained) + its attribute string
    (trained). `examples` must leave room for the string (`attribute_examples` with seq_length reduced by
    `attribute_string_budget`)."""
    out = []
    for example in examples:
        target = attribute_string_ids(schema, tokenizer, template, example.targets)
        out.append(
            Example(example.ids + tuple(target), (False,) * len(example.ids) + (True,) * len(target), example.source)
        )
    return out


def parse_attribute_string(schema: AttributeSchema, text: str) -> tuple[dict[str, float], list[str]]:
    """What a generative APM wrote → (values by attribute, problems). Each `name:value` item is read on its
    own, so one bad item costs only that attribute: unknown names, repeats, non-numbers and values outside
    the schema's range are problems, not values."""
    values: dict[str, float] = {}
    problems = []
    for item in filter(None, (part.strip() for part in text.strip().split(","))):
        name, sep, value = item.partition(":")
        try:
            number = float(value) if sep else None
        except ValueError:
            number = None
        if (
            number is None
            or name not in schema.attributes
            or name in values
            or not schema.min_value <= number <= schema.max_value
        ):
            problems.append(item)
        else:
            values[name] = number
    return values, problems
