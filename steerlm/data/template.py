"""The SteerLM prompt template (NeMo-Aligner compatible), rendered as trainable / masked segments.

    <extra_id_0>System
    {system}
    <extra_id_1>User
    {user turn}
    <extra_id_1>Assistant
    <extra_id_2>{attribute string}
    {assistant turn}
    <extra_id_1>User
    ...

By default the loss covers each assistant response (with its newline) and the `<extra_id_1>` that
closes it — the model learns where to stop — while the system prompt, user turns, role headers and
the attribute line are given, never predicted. The closing `<extra_id_1>` doubles as the first token
of the next turn's header, exactly as in the concatenated text. At inference the prompt ends with
`<extra_id_1>Assistant\\n<extra_id_2>{values}\\n` and generation stops at `<extra_id_1>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.records import Conversation, Role, Turn


class Tokenization(str, Enum):
    """How the rendered template becomes token ids (docs/template_and_batching.md, "Tokens").

    `markers`: `<extra_id_0/1/2>` are single added token ids, BOS comes first, and each segment is encoded as
    it reads after the text before it, so the loss mask follows segment boundaries exactly.
    `nemo`: NeMo-Aligner's ids — the whole rendered string in one encode call, the markers ordinary text,
    no BOS — and NeMo's chat-SFT loss mask; what a model trained by NeMo-Aligner was trained on.
    """

    markers = "markers"
    nemo = "nemo"

    @property
    def markers_are_tokens(self) -> bool:
        """Whether the tokenizer must hold `<extra_id_0/1/2>` as single ids (an HF tokenizer gains them)."""
        return self is Tokenization.markers


@dataclass(frozen=True)
class TemplateConfig:
    """Every literal of the template, so other chat formats can be expressed without code changes."""

    system_prefix: str = "<extra_id_0>System\n"
    user_prefix: str = "<extra_id_1>User\n"
    assistant_prefix: str = "<extra_id_1>Assistant\n"
    label_prefix: str = "<extra_id_2>"
    turn_suffix: str = "\n"
    end_of_turn: str = "<extra_id_1>"  # trained after each response; the stop string at inference
    condition_on_attributes: bool = True  # False: no attribute line (the plain-SFT baseline)
    answer_only_loss: bool = True  # False: every token is trained
    # Assistant turns without labels (e.g. the history packed into a HelpSteer2 prompt) are trained
    # like labelled ones, as in NeMo-Aligner's conversation datasets; False makes them context only.
    train_unlabelled_responses: bool = True
    tokenization: Tokenization = Tokenization.markers


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


class SteerLMTemplate:
    def __init__(self, schema: AttributeSchema, config: TemplateConfig = TemplateConfig()) -> None:
        self.schema = schema
        self.config = config

    def _header(self, prefix: str, after_response: bool) -> str:
        """A turn header; after a trained response its leading end-of-turn token was already emitted."""
        end = self.config.end_of_turn
        return prefix[len(end) :] if after_response and end and prefix.startswith(end) else prefix

    def label_line(self, labels: Labels | None) -> str:
        """The attribute line of an answer with `labels` (empty without labels or attribute conditioning)."""
        if not self.config.condition_on_attributes or labels is None:
            return ""
        return f"{self.config.label_prefix}{self.schema.format(labels)}{self.config.turn_suffix}"

    def trains_response(self, turn: Turn) -> bool:
        """Whether an assistant turn's response (and its closing marker) is trained under answer-only loss."""
        return turn.labels is not None or self.config.train_unlabelled_responses

    def segments(self, conversation: Conversation) -> list[Segment]:
        """The whole conversation; concatenating the texts gives the training string."""
        c = self.config
        train_all = not c.answer_only_loss
        out = [Segment(f"{c.system_prefix}{conversation.system}{c.turn_suffix}", train_all)]
        after_response = False
        for turn in conversation.turns:
            if turn.role == Role.user:
                text = self._header(c.user_prefix, after_response) + turn.text + c.turn_suffix
                out.append(Segment(text, train_all))
                after_response = False
            else:
                header = self._header(c.assistant_prefix, after_response) + self.label_line(turn.labels)
                out.append(Segment(header, train_all))
                trained = train_all or self.trains_response(turn)
                out.append(Segment(turn.text + c.turn_suffix + c.end_of_turn, trained))
                after_response = True
        return [segment for segment in out if segment.text]

    def render(self, conversation: Conversation) -> str:
        return "".join(segment.text for segment in self.segments(conversation))

    def attribute_prompt(self, system: str, turns: list[Turn]) -> str:
        """What an attribute model reads to rate the last (assistant) turn of `turns`.

        The conversation without attribute lines, ending with the label prefix where the rated turn's
        attribute string would follow (`…{response}\\n<extra_id_2>`): the regression APM reads its
        scores at that last token, the generative APM continues with the attribute string.
        """
        c = self.config
        plain = SteerLMTemplate(
            self.schema, TemplateConfig(**{**self.config.__dict__, "condition_on_attributes": False})
        )
        history = plain.inference_prompt(system, turns[:-1], None)
        return history + turns[-1].text + c.turn_suffix + c.label_prefix

    def inference_segments(self, system: str, turns: list[Turn], labels: Labels | None) -> list[Segment]:
        """History (ending with a user turn) plus the assistant header and the requested attributes.

        The same segments training builds for that prefix, so `collate.prompt_ids` tokenises them into exactly
        the ids the model saw in training under either tokenization.
        """
        c = self.config
        history = (
            self.segments(Conversation(system=system, turns=tuple(turns)))
            if turns
            else [Segment(f"{c.system_prefix}{system}{c.turn_suffix}", False)]
        )
        after_response = bool(turns) and turns[-1].role == Role.assistant
        return history + [Segment(self._header(c.assistant_prefix, after_response) + self.label_line(labels), False)]

    def inference_prompt(self, system: str, turns: list[Turn], labels: Labels | None) -> str:
        return "".join(segment.text for segment in self.inference_segments(system, turns, labels))
