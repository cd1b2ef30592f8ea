"""OpenAI's chat completions (`POST /v1/chat/completions`) with SteerLM's `attributes`: the request checked in
full and turned into the prompt the model was trained on (`Steering`), the choices rendered as a
`chat.completion` or as its SSE chunks; and the profiles a request starts from (the server's defaults or a
configured team profile, named by `<model>:<profile>`, `profile` or the request's API key)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, Field

from steerlm.config.inference import ServeConfig
from steerlm.data.attributes import Labels
from steerlm.inference.engine import GenerationJob, Service
from steerlm.inference.generate import Delta, TokenLogprob
from steerlm.inference.http_api import (
    LEAST_LOGPROB,
    ApiError,
    JobEvents,
    OpenAIReply,
    SamplingRequest,
    answer,
    check_limit,
    check_unsupported,
)
from steerlm.inference.steering import ChatMessage, ResponseText
from steerlm.tokenizers import Tokenizer


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    role: str
    content: str | list[TextPart]

    def message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ChatMessage(self.role, text)


class ChatCompletionRequest(SamplingRequest):
    messages: list[MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # SteerLM: attribute name → value (null: unset a default), or an attribute string "name:value,name:value"
    attributes: dict[str, Any] | str | None = None
    profile: str | None = None  # SteerLM: a configured profile (or "model": "<model>:<profile>")


@dataclass(frozen=True)
class Profile:
    """What a request starts from: the server's defaults (`name` None) or a configured profile's."""

    name: str | None
    labels: Labels
    system_prompt: str | None
    max_tokens: int
    max_n: int

    @property
    def caps(self) -> str:
        """The config keys of this profile's caps, for error messages."""
        return f"profiles.{self.name}" if self.name else "limits"


def profiles(cfg: ServeConfig, service: Service) -> dict[str | None, Profile]:
    limits = cfg.limits
    out: dict[str | None, Profile] = {
        None: Profile(None, service.steering.defaults, None, limits.max_tokens, limits.max_n)
    }
    for name, profile in cfg.profiles.items():
        out[name] = Profile(
            name,
            service.presets[name],
            profile.system_prompt,
            profile.max_tokens or limits.max_tokens,
            profile.max_n or limits.max_n,
        )
    return out


class ChatCompletions:
    """POST /v1/chat/completions: request → prompt and sampling rows → a generation job → the response."""

    def __init__(self, service: Service, cfg: ServeConfig, name: str) -> None:
        self.service, self.cfg, self.name = service, cfg, name
        self.profiles = profiles(cfg, service)

    def profile_of(self, requested: str, profile: str | None, key_profile: str | None) -> Profile:
        """The profile a request uses: named by its `model` (`<model>:<profile>`) or `profile`, else its API
        key's. A key bound to a profile may not use another."""
        model, colon, named = requested.partition(":")
        if model != self.name or (colon and not named):
            ids = ", ".join(self.name + (f":{p}" if p else "") for p in self.profiles)
            message = f"model {requested!r} does not exist; this server serves {ids}"
            raise ApiError(404, message, param="model", code="model_not_found")
        if named and profile and named != profile:
            message = f"model names profile {named!r} but profile is {profile!r}"
            raise ApiError(400, message, param="profile", code="conflicting_profile")
        chosen = named or profile
        if key_profile is not None and chosen and chosen != key_profile:
            message = f"this API key may use profile {key_profile!r} only"
            raise ApiError(403, message, "permission_error", param="model", code="profile_not_allowed")
        name = chosen or key_profile
        if name not in self.profiles:
            listed = ", ".join(p for p in self.profiles if p) or "none"
            message = f"profile {name!r} does not exist; the profiles are: {listed}"
            raise ApiError(404, message, param="model", code="profile_not_found")
        return self.profiles[name]

    def _job(
        self, body: ChatCompletionRequest, events: JobEvents, key_profile: str | None
    ) -> tuple[GenerationJob, int, dict]:
        """The request checked in full and turned into a job; ApiError or RequestError name what is wrong."""
        profile = self.profile_of(body.model, body.profile, key_profile)
        check_unsupported(body.model_extra, "it steers responses with the `attributes` object")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None:
            check_limit(
                max_tokens, profile.max_tokens, "max_tokens", f"{profile.caps}.max_tokens", "max_tokens_too_large"
            )
        check_limit(body.n, profile.max_n, "n", f"{profile.caps}.max_n", "n_too_large")
        prompt, labels = self.prompt(body.messages, body.attributes, profile)
        params = body.sampling(self.cfg, max_tokens, bool(body.logprobs), body.top_logprobs)
        job = GenerationJob(
            sink=events,
            request_id=events.request_id,
            route="chat",
            profile=profile.name or "",
            prompts=[prompt] * body.n,
            params=params,
            adapter=self.service.adapters.get(profile.name or "", 0),
        )
        return job, len(prompt), labels or {}

    def prompt(
        self, messages: Sequence[MessageIn], attributes: dict[str, Any] | str | None, profile: Profile
    ) -> tuple[list[int], Labels | None]:
        """The prompt ids that ask for the next assistant turn, and the attribute values they carry."""
        steering = self.service.steering
        labels = steering.labels(attributes, base=profile.labels)
        system, turns = steering.conversation(
            [m.message() for m in messages], labels, system_prompt=profile.system_prompt
        )
        return steering.prompt_ids(system, turns, labels), labels

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> Any:
        events = JobEvents(request.state.request_id)
        job, prompt_tokens, labels = self._job(body, events, getattr(request.state, "key_profile", None))
        reply = Reply(self, body, prompt_tokens, labels, events.request_id)
        return await answer(self.service, job, events, request, reply, body.stream)


class Reply(OpenAIReply):
    """One request's choices as they grow, rendered as a `chat.completion` or as its SSE chunks."""

    kind, chunk_kind = "chat.completion", "chat.completion.chunk"

    def __init__(
        self, route: ChatCompletions, body: ChatCompletionRequest, prompt_tokens: int, labels: dict, request_id: str
    ) -> None:
        super().__init__("chatcmpl", request_id, body.model, prompt_tokens, body.stream_options)
        suffix = route.service.steering.template.config.turn_suffix
        self.rows = [ResponseText(suffix) for _ in range(body.n)]
        self.tokenizer = route.service.steering.tokenizer
        self.logprobs: list[list[dict]] | None = [[] for _ in range(body.n)] if body.logprobs else None
        self.labels = labels
        self.untrained = route.service.steering.untrained(labels)

    def completion_tokens(self) -> int:
        return sum(row.tokens for row in self.rows)

    def push(self, delta: Delta) -> tuple[str, list[dict]]:
        """The response text a delta adds to its choice, and its tokens' log-probabilities in OpenAI's form."""
        text = self.rows[delta.index].push(delta)
        if self.logprobs is None:
            return text, []
        entries = openai_logprobs(self.tokenizer, delta.logprobs)
        self.logprobs[delta.index] += entries
        return text, entries

    def _logprobs(self, entries: list[dict]) -> dict | None:
        return None if self.logprobs is None else {"content": entries, "refusal": None}

    def completion(self) -> dict:
        choices = []
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                raise RuntimeError(f"choice {i} has no finish reason: its job ended before the row finished")
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": row.text},
                    "logprobs": None if self.logprobs is None else self._logprobs(self.logprobs[i]),
                    "finish_reason": row.finish_reason.value,
                }
            )
        body = {**self.envelope(self.kind, choices), "usage": self.usage(), "attributes": self.labels}
        if self.untrained:
            body["untrained_attributes"] = self.untrained  # requested values no trained attribute line carried
        return body

    async def chunks(self, events: JobEvents, first: list) -> AsyncIterator[str]:
        yield self.chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.rows))
            ]
        )
        event = first
        while event is not None:
            texts, finishes = [], []  # a chunk holds one entry per choice: text first, its finish after
            for delta in event:
                text, entries = self.push(delta)
                if text or entries:
                    texts.append(
                        {
                            "index": delta.index,
                            "delta": {"content": text},
                            "logprobs": self._logprobs(entries),
                            "finish_reason": None,
                        }
                    )
                if delta.finish_reason is not None:
                    finishes.append(
                        {
                            "index": delta.index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": delta.finish_reason.value,
                        }
                    )
            for choices in (texts, finishes):
                if choices:
                    yield self.chunk(choices)
            event = await events.next()


def openai_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> list[dict]:
    """`TokenLogprob`s as OpenAI's `logprobs.content` entries: each token's text (decoded alone), its UTF-8
    bytes and log-probability, and its `top_logprobs` in the same form."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, LEAST_LOGPROB), "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(item.token_id, item.logprob), "top_logprobs": [entry(i, value) for i, value in item.top]}
        for item in logprobs
    ]
