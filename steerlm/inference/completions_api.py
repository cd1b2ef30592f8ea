"""OpenAI's text completions (`POST /v1/completions`): raw prompts continued, and scored token by token.

This is the route evaluation harnesses call. lm-evaluation-harness's `local-completions` model scores a
choice of a multiple-choice task (a `loglikelihood` request) by sending the context's and the choice's token
ids with `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`, summing `logprobs.token_logprobs` over
the choice's positions and comparing each with the largest of its `top_logprobs` (is it the greedy
continuation?); its `generate_until` tasks send text with `stop`. The answer has OpenAI's (and vLLM's) shape:
per choice `text` (after the prompt's own text with `echo`), `logprobs` {`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`} and `finish_reason`; `usage` counts each prompt once.

- `prompt`: a string, a list of strings, a list of token ids or a list of such lists. A string is encoded
  after the tokenizer's BOS (as HF tokenizers encode by default, and as steerlm's pretraining data starts
  every document); ids are taken as sent. `n` choices per prompt: choice `i * n + j` is prompt i's j-th.
- `logprobs` k (0 to 20): each generated token's log-probability under the model (`TokenLogprob`: before
  temperature, top-k and top-p) and, in `top_logprobs`, its k most likely alternatives plus the token itself
  (up to k + 1 entries, as OpenAI documents), keyed by their text; with `echo`, the prompt's tokens too,
  each given the tokens before it — the first has null, nothing precedes it.
- `tokens[i]` is token i's text as it reads after the tokens before it (a token that ends inside a UTF-8
  character reads U+FFFD; a BOS this server put before a string prompt reads ""), `text_offset[i]` where it
  starts in the choice's `text`: the tokens join to the text wherever the tokenizer decodes the prompt back
  to its text. The answer continues the prompt's text (`SamplingParams.text_after_prompt`): after "The
  capital of France is" a SentencePiece model's "▁Paris" reads " Paris", as in `decode(prompt + answer)`.
- Without the chat template there is no attribute line to impose: `model` is the served model's name, or
  `<model>:<profile>` of a profile with a LoRA adapter (`profiles.<name>.adapter`), whose rows then run on that
  adapter — its attributes and system prompt do not apply to a raw prompt, so a profile without an adapter is
  refused; an API key bound to a profile may not use this route. Refused by name: a
  `suffix`, `best_of` other than n, and the fields `/v1/chat/completions` refuses (`logit_bias`, penalties).
- `max_tokens` defaults to 16 (OpenAI's default for this route); 0 generates nothing — with `echo` and
  `logprobs`, the prompt is scored alone, the legacy API's scoring request (the row ends at its prefill,
  `finish_reason` "length"). Temperature, top_p, top_k, stop and seed default to the server's `sampling`
  settings, as on the chat route.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from steerlm.config.inference import MAX_TOP_LOGPROBS, ServeConfig
from steerlm.inference.engine import GenerationJob
from steerlm.inference.generate import TEXT_CONTEXT_TOKENS, Delta, FinishReason, SamplingParams, TokenLogprob
from steerlm.inference.http_api import (
    LEAST_LOGPROB,
    ApiError,
    JobEvents,
    OpenAIReply,
    SamplingRequest,
    check_limit,
    check_unsupported,
    check_vocabulary,
)
from steerlm.tokenizers import Tokenizer

OPENAI_DEFAULT_MAX_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_of_four_shapes(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One message for a prompt of none of the shapes (pydantic would report each shape's failure)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            ) from None


@dataclass(frozen=True)
class TextJob:
    """A request's prompts (ids, and the text `echo` repeats), how many leading ids of each the server added
    (a BOS before a string prompt), and one sampling setting per choice."""

    prompts: list[list[int]]
    texts: list[str]
    added: list[int]
    params: list[SamplingParams]

    def job(self, events: JobEvents, n: int, profile: str = "", adapter: int = 0) -> GenerationJob:
        """The job of `n` rows per prompt; `profile` / `adapter`: a profile's LoRA adapter the rows use."""
        rows = [prompt for prompt in self.prompts for _ in range(n)]
        return GenerationJob(
            sink=events,
            request_id=events.request_id,
            route="completions",
            profile=profile,
            prompts=rows,
            params=self.params,
            adapter=adapter,
        )


def string_prompt_ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """A string prompt's ids: the tokenizer's BOS first (unless `add_special_tokens` is false), then the text's,
    where the text of the tokenizer's BOS, EOS and pad tokens is their id — as HF tokenizers (and so vLLM)
    encode special tokens written in a prompt, and as clients expect who find a token's id by encoding its
    text (lm-evaluation-harness's remote tokenizer does so for EOS); steerlm's own `encode` maps only the
    template's markers so."""
    specials: dict[str, int] = {}
    for token in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):  # a pad sharing EOS's text reads as EOS
        if token is not None and tokenizer.decode([token]):
            specials.setdefault(tokenizer.decode([token]), token)
    ids = [tokenizer.bos_id] if add_special_tokens and tokenizer.bos_id is not None else []
    start = 0
    if specials:
        for match in re.finditer("|".join(map(re.escape, sorted(specials, key=len, reverse=True))), text):
            if match.start() > start:
                ids += tokenizer.encode(text[start : match.start()])
            ids.append(specials[match.group()])
            start = match.end()
    return ids + tokenizer.encode(text[start:]) if start < len(text) else ids


def _prompts(body: CompletionRequest, tokenizer: Tokenizer, max_prompt_tokens: int) -> TextJob:
    """The prompts' ids, each checked (1 to `max_prompt_tokens` ids, each in the vocabulary), or an ApiError
    naming it (`prompt`, or `prompt[i]` in a list)."""
    one = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], int))
    given: list = [body.prompt] if one else list(body.prompt)
    if not given:
        raise ApiError(
            400,
            "prompt is an empty list: send a string, token ids, or a list of them",
            param="prompt",
            code="empty_prompt",
        )
    ids, texts, added = [], [], []
    for index, item in enumerate(given):
        param = "prompt" if one else f"prompt[{index}]"
        if isinstance(item, str):
            ids.append(string_prompt_ids(tokenizer, item))
            texts.append(item)
            added.append(int(tokenizer.bos_id is not None))
        else:
            check_vocabulary(item, tokenizer.vocab_size, param)
            ids.append(list(item))
            texts.append(tokenizer.decode(item))
            added.append(0)
        if not 1 <= len(ids[-1]) <= max_prompt_tokens:
            raise ApiError(
                400,
                f"{param} has {len(ids[-1])} tokens; the model takes 1 to {max_prompt_tokens} before generating",
                param=param,
                code="context_length_exceeded",
            )
    return TextJob(ids, texts, added, [])


def completion_job(body: CompletionRequest, cfg: ServeConfig, tokenizer: Tokenizer, max_prompt_tokens: int) -> TextJob:
    """The request checked in full, as prompts and one sampling setting per choice; or an ApiError naming the
    field."""
    if body.suffix is not None:
        raise ApiError(
            400, "suffix (text after the completion) is not supported", param="suffix", code="unsupported_parameter"
        )
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(
            400,
            f"best_of={body.best_of}: ranking several samples server-side is not supported; leave best_of unset "
            "(or equal to n) and compare the choices' logprobs",
            param="best_of",
            code="unsupported_parameter",
        )
    check_unsupported(body.model_extra)
    limits = cfg.limits
    max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    check_limit(max_tokens, limits.max_tokens, "max_tokens", "limits.max_tokens", "max_tokens_too_large")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400,
            f"logprobs={body.logprobs} is out of range: use 0 to {MAX_TOP_LOGPROBS} (alternatives per token)",
            param="logprobs",
            code="invalid_logprobs",
        )
    text = _prompts(body, tokenizer, max_prompt_tokens)
    choices = len(text.prompts) * body.n
    if choices > limits.max_n:
        raise ApiError(
            400,
            f"{len(text.prompts)} prompts x n={body.n} make {choices} choices, over this server's limit of "
            f"{limits.max_n} per request (limits.max_n)",
            param="n" if len(text.prompts) == 1 else "prompt",
            code="too_many_choices",
        )
    scored = body.logprobs is not None
    params = body.sampling(cfg, max_tokens, scored, body.logprobs)
    params = [replace(p, prompt_logprobs=scored and body.echo, text_after_prompt=True) for p in params]
    return replace(text, params=params * len(text.prompts))


@dataclass
class _Choice:
    """One choice as it grows: its text, and its tokens' entries of OpenAI's `logprobs` object."""

    prompt: list[int]
    prompt_text: str
    added: int
    ids: list[int] = field(default_factory=list)  # the prompt's then the answer's, as far as entries were made
    text: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    started: bool = False
    entries: dict[str, list] = field(
        default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    )
    offset: int = 0  # where the next token's text starts in `text`


class TextReply(OpenAIReply):
    """One request's choices, rendered as a `text_completion` or as its SSE chunks."""

    kind = chunk_kind = "text_completion"

    def __init__(self, body: CompletionRequest, text: TextJob, tokenizer: Tokenizer, request_id: str) -> None:
        prompt_tokens = sum(len(prompt) for prompt in text.prompts)
        super().__init__("cmpl", request_id, body.model, prompt_tokens, body.stream_options)
        self.tokenizer, self.echo, self.logprobs = tokenizer, body.echo, body.logprobs
        self.choices = [
            _Choice(list(prompt), prompt_text, added)
            for prompt, prompt_text, added in zip(text.prompts, text.texts, text.added)
            for _ in range(body.n)
        ]

    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)

    def _entry(self, choice: _Choice, token: int, item: TokenLogprob | None, read: bool = True) -> dict[str, Any]:
        """Token `token`'s entries after `choice.ids` (its text in that context; `read` False: a token the
        server added, which reads "")."""
        window = choice.ids[-TEXT_CONTEXT_TOKENS:]
        head = self.tokenizer.decode(window)

        def text(candidate: int) -> str:
            return self.tokenizer.decode([*window, candidate])[len(head) :] if read else ""

        piece = text(token)
        top: dict[str, float] | None = None
        if item is not None:
            top = {}
            for candidate, value in item.top[: self.logprobs]:
                top.setdefault(text(candidate), max(value, LEAST_LOGPROB))
            top.setdefault(piece, max(item.logprob, LEAST_LOGPROB))
        entry = {
            "tokens": piece,
            "token_logprobs": None if item is None else max(item.logprob, LEAST_LOGPROB),
            "top_logprobs": top,
            "text_offset": choice.offset,
        }
        choice.ids.append(token)
        choice.offset += len(piece)
        return entry

    def push(self, delta: Delta) -> tuple[str, dict[str, list] | None]:
        """The text a delta adds to its choice and the `logprobs` entries of its tokens (None without logprobs)."""
        choice = self.choices[delta.index]
        entries: list[dict[str, Any]] = []
        text = ""
        if not choice.started:
            choice.started = True
            if self.echo:
                text = choice.prompt_text
                if self.logprobs is not None:
                    scored = [None, *(delta.prompt_logprobs or ())]
                    if len(scored) != len(choice.prompt):
                        raise RuntimeError(f"choice {delta.index}: {len(scored) - 1} prompt log-probabilities")
                    for position, (token, item) in enumerate(zip(choice.prompt, scored)):
                        entries.append(self._entry(choice, token, item, read=position >= choice.added))
            else:
                choice.ids = choice.prompt[:]  # the answer's tokens read after the prompt's
                choice.offset = 0
        text += delta.text
        if self.logprobs is not None:
            if len(delta.logprobs) != len(delta.token_ids):
                raise RuntimeError(f"choice {delta.index}: a delta without a log-probability per token")
            entries += [self._entry(choice, item.token_id, item) for item in delta.logprobs]
        choice.text += text
        choice.tokens = delta.tokens
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        if self.logprobs is None:
            return text, None
        new = {key: [entry[key] for entry in entries] for key in choice.entries}
        for key, values in new.items():
            choice.entries[key] += values
        return text, new

    def completion(self) -> dict:
        out = []
        for index, choice in enumerate(self.choices):
            if choice.finish_reason is None:
                raise RuntimeError(f"choice {index} has no finish reason: its job ended before the row finished")
            logprobs = None if self.logprobs is None else choice.entries
            out.append(
                {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason.value}
            )
        return {**self.envelope(self.kind, out), "usage": self.usage()}

    async def chunks(self, events: JobEvents, first: list) -> AsyncIterator[str]:
        event = first
        while event is not None:
            for delta in event:
                text, entries = self.push(delta)
                finish = None if delta.finish_reason is None else delta.finish_reason.value
                if text or (entries and entries["tokens"]) or finish:
                    yield self.chunk(
                        [{"index": delta.index, "text": text, "logprobs": entries, "finish_reason": finish}]
                    )
            event = await events.next()
