"""NeMo's chat-SFT tokenisation of a SteerLM conversation: `template.tokenization=nemo`.

NeMo-Aligner trains SteerLM SFT with NeMo's `GPTSFTChatDataset` (nemo/collections/nlp/data/language_modeling/
megatron/gpt_sft_chat_dataset.py, `preprocess` and `_mask_targets`) and the special tokens
`system_turn_start=<extra_id_0>`, `turn_start=<extra_id_1>`, `label_start=<extra_id_2>`, `end_of_turn` and
`end_of_name` a newline. Its ids are the whole rendered conversation in one encode call (no BOS; the markers
are whatever the tokenizer makes of them as text). Its loss mask is laid out by token counts, not by
characters:

- the header (`<extra_id_0>System\\n{system}\\n`) is `len(encode(header))` ids, never trained;
- turn i spans `len(cont(value_i))` ids, where `cont(s)` encodes `s` after "\\x00" and drops the "\\x00"'s ids
  (NeMo's PREFIX_STR, which keeps SentencePiece from adding a word start), and `value_i` is
  `{turn_start}{role}\\n` + the attribute line (`<extra_id_2>{label}\\n`, when the turn has a label) + text + `\\n`;
- the first turn is masked whole; a later User turn is masked except its first `len(cont(turn_start))` ids
  (the marker that closes the answer before it); an Assistant turn is masked over its role line and, when the
  label-start ids occur in it, up to and including the first `cont("\\n")` after the role line;
- every id after the last turn (the closing `<extra_id_1>` of a final answer) is trained.

So the mask follows NeMo even where its counts and the joined string's ids disagree. Where NeMo would crash
(the label-start ids found away from the role line) or corrupt every later turn (an attribute line whose newline
id cannot be found), the row is refused with a DataError instead. steerlm's own switches apply on top:
`answer_only_loss=false` trains every id, and an assistant turn the template leaves untrained
(`train_unlabelled_responses=false`) is masked with its closing marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from steerlm.data.records import Conversation, Role
from steerlm.errors import DataError

if TYPE_CHECKING:
    from steerlm.data.template import SteerLMTemplate, TemplateConfig
    from steerlm.tokenizers.base import Tokenizer

PREFIX = "\x00"  # NeMo's PREFIX_STR


class _Measures:
    """What NeMo measures of the template's fixed pieces, each encoded after "\\x00" (its PREFIX_STR)."""

    def __init__(self, tokenizer: Tokenizer, config: TemplateConfig) -> None:
        self.tokenizer = tokenizer
        self.prefix = len(tokenizer.encode(PREFIX))
        self.label_start = self.cont(config.label_prefix)
        self.name_end = self.cont(config.turn_suffix)
        self.turn_start = len(self.cont(config.end_of_turn))
        self.role_line = {
            Role.user: len(self.cont(config.user_prefix)),
            Role.assistant: len(self.cont(config.assistant_prefix)),
        }

    def cont(self, text: str) -> list[int]:
        return self.tokenizer.encode(PREFIX + text)[self.prefix :]


def _find(part: Sequence[int], whole: Sequence[int]) -> int:
    """The first index where `part` occurs in `whole`, or -1 (NeMo's identify_start_index_of_subsequence)."""
    for start in range(len(whole) - len(part) + 1):
        if list(whole[start : start + len(part)]) == list(part):
            return start
    return -1


def nemo_chat_ids(
    template: SteerLMTemplate, conversation: Conversation, tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    """Ids and trained flags of `conversation` exactly as NeMo's chat-SFT dataset builds them (module docstring)."""
    c = template.config
    header = f"{c.system_prefix}{conversation.system}{c.turn_suffix}"
    values = [
        (c.user_prefix if turn.role == Role.user else c.assistant_prefix)
        + (template.label_line(turn.labels) if turn.role == Role.assistant else "")
        + turn.text
        + c.turn_suffix
        for turn in conversation.turns
    ]
    closing = c.end_of_turn if conversation.turns[-1].role == Role.assistant else ""
    ids = tokenizer.encode(header + "".join(values) + closing)
    header_ids = tokenizer.encode(header)
    if ids[: len(header_ids)] != header_ids:
        raise DataError(
            conversation.source, None, "system", "the system header's ids change when the conversation follows it"
        )
    measures = _Measures(tokenizer, c)
    trainable = [True] * len(ids)
    _mask(trainable, 0, len(header_ids))
    spans = []
    position = len(header_ids)
    for index, (turn, value) in enumerate(zip(conversation.turns, values)):
        turn_ids = measures.cont(value)
        head = _masked_head(measures, turn.role, turn_ids, conversation.source, index)
        end = position + len(turn_ids)
        if index == 0 or (turn.role == Role.user and index == 1):
            _mask(trainable, position, end)
        elif turn.role == Role.user:
            _mask(trainable, position + measures.turn_start, end)
        else:
            _mask(trainable, position, position + head)
        spans.append((position, end))
        position = end
    if not c.answer_only_loss:
        return ids, [True] * len(ids)
    for index, turn in enumerate(conversation.turns):
        if turn.role == Role.assistant and not template.trains_response(turn):
            closing_end = spans[index + 1][0] + measures.turn_start if index + 1 < len(spans) else len(ids)
            _mask(trainable, spans[index][0], closing_end)
    return ids, trainable


def _mask(trainable: list[bool], start: int, end: int) -> None:
    trainable[start:end] = [False] * len(trainable[start:end])


def _masked_head(measures: _Measures, role: Role, turn_ids: list[int], source: str, index: int) -> int:
    """How many of a turn's ids NeMo masks before the answer (used for Assistant turns): the role line, and the
    attribute line when the label-start ids occur in the turn. NeMo checks every turn, so a DataError for any
    turn where it would stop, or where it would misplace every later mask."""
    skip = measures.role_line[role]
    location = _find(measures.label_start, turn_ids)
    if location < 0:
        return skip
    where = f"conversations[{index}]"
    if location != skip:
        raise DataError(
            source,
            None,
            where,
            f"the label-start ids occur at id {location} of the turn, not right after its role line ({skip} ids); "
            "NeMo's chat dataset stops on such a row",
            "remove the attribute-line marker from the turn's text",
        )
    newline = _find(measures.name_end, turn_ids[skip:])
    if newline < 0:
        raise DataError(
            source,
            None,
            f"{where}.label",
            "no newline id follows the attribute line (it merges with the text after it), so NeMo's rule "
            "would mask this turn whole and shift the mask of every later turn",
            "remove the leading newline of the response",
        )
    return skip + newline + len(measures.name_end)
