"""Requests → what the model reads: checked attribute values, and prompt ids built by the SteerLM template.

A request names attribute values (`{"humor": 3}`, or NeMo-Aligner's attribute string `"humor:3"`); they are
checked against the checkpoint's schema (name, number, range, integer) and laid over the defaults: the
configured values over the schema's own (`AttributeSchema.defaults`, SteerLM's best response). Chat messages in
OpenAI's roles become the template's conversation: system messages first, then user and assistant turns
alternating, ending with the user turn to answer. Prompt ids come from `collate.tokenize` of the template's
segments — the path training took — so the model reads exactly what it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

from steerlm.config.inference import (
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    SEED_LIMIT,
    TOP_K_LIMIT,
    SamplingDefaults,
)
from steerlm.data.attribute_lines import AttributeLines
from steerlm.data.attributes import AttributeSchema, Labels, ValueFault
from steerlm.data.collate import prompt_ids
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate
from steerlm.errors import ConfigError
from steerlm.inference.generate import Delta, FinishReason, SamplingParams
from steerlm.tokenizers import Tokenizer

SYSTEM_ROLES = ("system", "developer")  # developer: OpenAI's newer name for system instructions
CHAT_ROLES = {"user": Role.user, "assistant": Role.assistant}


class RequestError(ValueError):
    """A request that cannot be served as asked. `param` is the offending field (OpenAI's error `param`,
    e.g. `attributes.humor` or `messages[2].role`), `code` a stable machine-readable reason."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, developer, user or assistant
    content: str


def _range(schema: AttributeSchema) -> str:
    kind = "an integer" if schema.integer else "a number"
    return f"{kind} from {schema.min_value:g} to {schema.max_value:g}"


def attribute_request(requested: Mapping[str, object] | str | None, prefix: str = "attributes") -> Mapping[str, object]:
    """A request's attribute values: a mapping (name → value; None unsets one) or an attribute string
    `name:value,name:value` as NeMo-Aligner's clients write the attribute line (`quality:4,toxicity:0,…`), which
    means the mapping of its items: values laid over the defaults like any others. Each item is exactly one
    `name:value` and names an attribute once (RequestError otherwise); a value that is no number is left for
    `check_attributes` to refuse, naming it."""
    if requested is None:
        return {}
    if not isinstance(requested, str):
        return requested
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in requested.split(","))):
        if item.count(":") != 1:
            raise RequestError(
                prefix,
                f"{prefix}: {item!r} is not name:value; write the attribute string as name:value,name:value",
                "invalid_attribute_string",
            )
        name, text = (part.strip() for part in item.split(":"))
        if name in values:
            raise RequestError(f"{prefix}.{name}", f"{prefix}: {name} is given twice", "invalid_attribute_string")
        try:
            values[name] = float(text)
        except ValueError:
            values[name] = text
    return values


def check_attributes(schema: AttributeSchema, values: Mapping[str, object], prefix: str = "attributes") -> Labels:
    """The set values of `values` (None: unset), checked; RequestError naming `prefix.NAME` otherwise."""
    out: Labels = {}
    for name, value in values.items():
        param = f"{prefix}.{name}"
        if name not in schema.attributes:
            raise RequestError(
                param,
                f"schema '{schema.name}' has no attribute {name!r}; its attributes are {', '.join(schema.attributes)}",
                "unknown_attribute",
            )
        if value is None:
            continue
        fault = schema.value_fault(name, value)
        if fault == ValueFault.not_a_number:
            raise RequestError(
                param, f"{param}={value!r} is not a number; give {_range(schema)}", "invalid_attribute_value"
            )
        if fault is not None:
            problem = "out of range" if fault == ValueFault.out_of_range else "not an integer"
            raise RequestError(
                param, f"{param}={value!r} is {problem}: {name} takes {_range(schema)}", "attribute_out_of_range"
            )
        number = cast(float, value)
        out[name] = int(number) if schema.integer else float(number)
    return out


class Steering:
    """One checkpoint's prompt builder: schema, template, tokenizer, default attributes and system prompt.

    `max_prompt_tokens` is the longest prompt the generator accepts (its sequence limit minus one), so a
    too-long conversation is refused here, for its request alone, rather than failing a whole batch. `trained`:
    the attribute lines the checkpoint's SFT run trained on, when it recorded them (`untrained` then names the
    requested values none of them carried).
    """

    def __init__(
        self,
        template: SteerLMTemplate,
        tokenizer: Tokenizer,
        defaults: Mapping[str, float | None],
        system_prompt: str,
        max_prompt_tokens: int,
        trained: AttributeLines | None = None,
    ) -> None:
        self.template, self.schema, self.tokenizer = template, template.schema, tokenizer
        self.trained = trained
        self.system_prompt, self.max_prompt_tokens = system_prompt, max_prompt_tokens
        # Configured values over the schema's own defaults (SteerLM's best response: a model trained on complete
        # attribute lines answers a partial one badly); null ones are the shipped YAML's placeholders for every
        # shipped schema's names. A model trained without attributes gets none.
        schema_defaults = self.schema.default_labels if self.conditioned else {}
        configured = {k: v for k, v in defaults.items() if v is not None}
        self.defaults: Labels = self.preset(configured, schema_defaults, "attributes")

    def preset(self, values: Mapping[str, float | None], base: Labels, key: str) -> Labels:
        """Configured attribute values (`key`: their config key) over `base`, checked like a request's;
        a ConfigError names the bad one."""
        try:
            return self.labels(values, base) or {}
        except RequestError as error:
            name = (error.param or "").removeprefix("attributes.")
            raise ConfigError(
                f"{key}.{name}" if name else key,
                values.get(name),
                error.message,
                f"set only attributes of schema '{self.schema.name}', each in range",
            ) from None

    def untrained(self, labels: Labels | None) -> list[str]:
        """`name:value` of each value in `labels` that none of the trained attribute lines carried (nothing when
        the run recorded no lines): the model answers such a request from lines it never saw."""
        if self.trained is None or not labels:
            return []
        return [
            f"{name}:{value:g}"
            for name, value in labels.items()
            if value is not None and self.trained.count(name, value) == 0
        ]

    @property
    def conditioned(self) -> bool:
        return self.template.config.condition_on_attributes

    def labels(self, requested: Mapping[str, object] | str | None = None, base: Labels | None = None) -> Labels | None:
        """`base` (the defaults) overlaid with the requested values (None unsets one; a string is an attribute
        string, `attribute_request`), in schema order; None when nothing is set, so the prompt carries no
        attribute line (as an unlabelled turn in training)."""
        requested = attribute_request(requested)
        checked = check_attributes(self.schema, requested)
        if checked and not self.conditioned:
            raise RequestError(
                "attributes",
                "this checkpoint was trained without attribute conditioning "
                "(sft.condition_on_attributes=false), so attributes cannot steer it; send none",
                "attributes_not_supported",
            )
        merged = {k: v for k, v in (self.defaults if base is None else base).items() if k not in requested}
        merged.update(checked)
        return {name: merged[name] for name in self.schema.attributes if name in merged} or None

    def conversation(
        self,
        messages: Sequence[ChatMessage],
        labels: Labels | None = None,
        last: Role = Role.user,
        system_prompt: str | None = None,
    ) -> tuple[str, list[Turn]]:
        """(system prompt, turns) of OpenAI-style messages whose last one is from `last`; without system
        messages, `system_prompt` or else the configured one.

        Assistant turns in the history carry `labels`: a conversation is steered by one set of values.
        """
        system: list[str] = []
        turns: list[Turn] = []
        for index, message in enumerate(messages):
            param = f"messages[{index}]"
            if message.role in SYSTEM_ROLES:
                if turns:
                    raise RequestError(
                        f"{param}.role",
                        f"a {message.role} message must come before the first user message",
                        "invalid_message_order",
                    )
                system.append(message.content)
                continue
            role = CHAT_ROLES.get(message.role)
            if role is None:
                raise RequestError(
                    f"{param}.role",
                    f"role {message.role!r} is not supported; use system, user or assistant",
                    "invalid_role",
                )
            expected = Role.user if not turns or turns[-1].role == Role.assistant else Role.assistant
            if role != expected:
                raise RequestError(
                    f"{param}.role",
                    f"expected a {expected.name} message: after the system messages, "
                    "user and assistant messages alternate, starting with user",
                    "invalid_message_order",
                )
            if role == Role.assistant and not message.content.strip():
                raise RequestError(f"{param}.content", "an assistant message must not be empty", "empty_message")
            turns.append(Turn(role, message.content, labels if role == Role.assistant else None))
        if not turns or turns[-1].role != last:
            raise RequestError("messages", f"the last message must be from the {last.name}", "invalid_message_order")
        return ("\n".join(system) if system else system_prompt or self.system_prompt), turns

    def prompt_ids(self, system: str, turns: Sequence[Turn], labels: Labels | None) -> list[int]:
        """Token ids of the prompt that asks for the next assistant turn with `labels`, tokenised as the model was
        trained (`template.tokenization`: BOS and single-id markers, or NeMo's one encode call)."""
        ids = prompt_ids(self.template, self.tokenizer, system, turns, labels)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(
                "messages",
                f"the prompt has {len(ids)} tokens; this model reads at most "
                f"{self.max_prompt_tokens} before answering. Shorten the conversation",
                "context_length_exceeded",
            )
        return ids

    def scoring_conversation(self, messages: Sequence[ChatMessage]) -> Conversation:
        """The conversation an APM rates: OpenAI-style messages ending with the assistant response."""
        system, turns = self.conversation(messages, None, last=Role.assistant)
        return Conversation(system, tuple(turns), "request")


class ResponseText:
    """One row's deltas → its response text.

    The template's turn suffix (a newline) before the end-of-turn token belongs to the template, not the
    answer: a trailing one is held back until more text follows, and dropped when the row stops.
    `tokens` counts what the model generated (for usage).
    """

    def __init__(self, suffix: str) -> None:
        self.suffix, self.held = suffix, ""
        self.text = ""
        self.tokens = 0
        self.finish_reason: FinishReason | None = None

    def push(self, delta: Delta) -> str:
        """The new response text this delta adds (possibly empty)."""
        self.tokens = delta.tokens
        pending, self.held = self.held + delta.text, ""
        self.finish_reason = delta.finish_reason
        if delta.finish_reason is not None:
            if delta.finish_reason == FinishReason.stop and self.suffix and pending.endswith(self.suffix):
                pending = pending[: -len(self.suffix)]
        else:
            keep = next((k for k in range(len(self.suffix), 0, -1) if pending.endswith(self.suffix[:k])), 0)
            if keep:
                pending, self.held = pending[:-keep], pending[-keep:]
        self.text += pending
        return pending


def sampling_params(
    defaults: SamplingDefaults,
    n: int = 1,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
) -> list[SamplingParams]:
    """One setting per row: the given values, the configured defaults for the rest. Row i samples with
    seed + i, so the n answers of one request differ (unless decoding is greedy).

    Every value the generator would refuse (or that would break its arithmetic) is refused here, naming the
    field, so a bad request fails alone and before it joins a batch."""
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise RequestError(
            "temperature",
            f"temperature={temperature!r} is below {MIN_TEMPERATURE:g}, where the scaled logits overflow; "
            "use 0 for greedy decoding",
            "invalid_temperature",
        )
    if top_p is not None and top_p < MIN_TOP_P:
        raise RequestError(
            "top_p",
            f"top_p={top_p!r} is below {MIN_TOP_P:g}; use top_k=1 to keep only the most likely token",
            "invalid_top_p",
        )
    if top_k is not None and not 0 <= top_k < TOP_K_LIMIT:
        raise RequestError("top_k", f"top_k={top_k} is out of range: use 0 (off) to 2**63 - 1", "invalid_top_k")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(
            "top_logprobs",
            f"top_logprobs={top_logprobs} is out of range: use 0 to {MAX_TOP_LOGPROBS}",
            "invalid_top_logprobs",
        )
    if top_logprobs and not logprobs:
        raise RequestError(
            "top_logprobs", 'top_logprobs needs logprobs: pass "logprobs": true as well', "invalid_top_logprobs"
        )
    base = SamplingParams(
        max_new_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        stop=tuple(defaults.stop if stop is None else stop),
        seed=defaults.seed if seed is None else seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
    )
    if not 0 <= base.seed <= SEED_LIMIT - n:
        raise RequestError(
            "seed",
            f"seed={base.seed} is out of range: choice i samples with seed + i, and seeds are 64-bit signed "
            f"integers, so with n={n} the seed must be between 0 and 2**63 - {n}",
            "invalid_seed",
        )
    return [replace(base, seed=base.seed + row) for row in range(n)]
