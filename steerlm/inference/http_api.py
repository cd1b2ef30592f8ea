"""The server's HTTP plumbing: OpenAI-shaped errors, request ids, API keys, body limits, a job's events.

Every request gets an id (`req_…`, in the `x-request-id` response header); the server's log names
requests by it, and a 500 answer carries it instead of the exception's text, so an operator can find what
happened without a client learning the server's internals.
"""

from __future__ import annotations

import abc
import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerlm.config.inference import ServeConfig, ServeLimits
from steerlm.errors import DataError
from steerlm.inference.engine import EngineBusy, EngineClosed, GenerationJob, Job, RequestTimeout, Service
from steerlm.inference.generate import Delta, SamplingParams
from steerlm.inference.steering import RequestError, sampling_params

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a 429 tells a client to wait: a queue slot frees as soon as a request joins the batch
LEAST_LOGPROB = -9999.0  # OpenAI's stand-in for a token too unlikely to have a finite log-probability
# Fields of OpenAI's schemas this server cannot honour: refused when set, rather than silently ignored.
UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
    "verbosity",
)
UNSET: tuple[object, ...] = (None, False, 0, [], {}, {"type": "text"})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The sampling and streaming fields OpenAI's chat and text completions share (`top_k`: an extension)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(
        self,
        cfg: ServeConfig,
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int | None,
    ) -> list[SamplingParams]:
        """One setting per choice — the request's values, the server's `sampling` defaults for the rest —
        checked (`stop` against the server's limits), or an ApiError / RequestError naming the field."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None:
            check_stop_strings(stop, cfg.limits, "stop", "stop strings")
        return sampling_params(
            cfg.sampling,
            self.n,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop,
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )


def check_unsupported(extra: Mapping[str, Any] | None, why: str = "") -> None:
    """A request's fields beyond the schema (`model_extra`) against `UNSUPPORTED`: an ApiError for the first
    one set to something other than its no-op value (`why`: what the message adds in parentheses)."""
    for key in UNSUPPORTED:
        if (extra or {}).get(key) not in UNSET:
            message = f"{key} is not supported by this server" + (f" ({why})" if why else "")
            raise ApiError(400, message, param=key, code="unsupported_parameter")


def check_limit(value: int, limit: int, param: str, key: str, code: str) -> None:
    """A request's `param` against the server's cap (config `key`): an ApiError naming both when over it."""
    if value > limit:
        raise ApiError(400, f"{param}={value} exceeds this server's limit of {limit} ({key})", param=param, code=code)


def check_vocabulary(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Token ids a request sends (`param`: its field) against the tokenizer's range: an ApiError naming the first
    one outside it."""
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        message = f"{param} holds token id {bad[0]}, outside the tokenizer's [0, {vocab_size})"
        raise ApiError(400, message, param=param, code="invalid_token_id")


def check_stop_strings(stops: Sequence[str], limits: ServeLimits, param: str, noun: str) -> None:
    """A request's stop strings (`param`: its field; `noun`: what the API calls them) against the server's
    limits, or an ApiError: none empty, at most `limits.max_stop_strings` of at most `limits.max_stop_chars`
    characters in all."""
    if not all(stops):
        raise ApiError(400, f"{noun} must not be empty", param=param, code="invalid_stop")
    if len(stops) > limits.max_stop_strings:
        raise ApiError(
            400,
            f"{len(stops)} {noun} exceed this server's limit of {limits.max_stop_strings} (limits.max_stop_strings)",
            param=param,
            code="too_many_stop_strings",
        )
    if sum(map(len, stops)) > limits.max_stop_chars:
        raise ApiError(
            400,
            f"the {noun} hold {sum(map(len, stops))} characters, over this server's limit of "
            f"{limits.max_stop_chars} (limits.max_stop_chars)",
            param=param,
            code="stop_too_long",
        )


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


def api_error(error: BaseException, request_id: str) -> ApiError:
    """The HTTP face of anything a request can run into; an unexpected error is logged under the request id
    and answered 500 with that id only."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        return ApiError(400, error.message, param=error.param, code=error.code)
    if isinstance(error, EngineBusy):
        return ApiError(
            429, str(error), "rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if isinstance(error, RequestTimeout):
        return ApiError(503, str(error), "server_error", code="request_timeout")
    if isinstance(error, EngineClosed):
        return ApiError(503, str(error), "server_error", code="unavailable")
    if isinstance(error, ClientDisconnected):
        return ApiError(499, "the client closed the connection", code="client_closed_request")
    if isinstance(error, (DataError, ValueError)):  # the generator's or scorer's checks of one request
        return ApiError(400, str(error), code="invalid_request")
    log.error("request %s failed", request_id, exc_info=error)
    return ApiError(
        500,
        f"internal error: the server's log has the details under request id {request_id}",
        "server_error",
        code="internal_error",
    )


class JobEvents:
    """A job's sink: hands engine events to the event loop (the engine thread must never block)."""

    def __init__(self, request_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.request_id = request_id

    def __call__(self, event: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self) -> Any:
        event = await self.queue.get()
        if isinstance(event, BaseException):
            raise api_error(event, self.request_id)
        return event


async def cancel_on_disconnect(receive: Receive, job: Job, events: JobEvents) -> None:
    """Wait for the client to go away (the request body has been read), then cancel its job and wake its
    handler. Run as a task beside a handler that awaits the job's events."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    events.queue.put_nowait(ClientDisconnected())


class RequestIds:
    """ASGI middleware: a fresh id per request, in `request.state.request_id` and the `x-request-id` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


MIN_KEY_LENGTH = 16


def read_api_keys(path: str, profiles: Collection[str]) -> dict[str, str | None]:
    """`KEY` or `KEY PROFILE` per line (blank lines and `#` comments skipped): key → the profile it is bound
    to (None: any). A short, repeated or badly formed key, or an unknown profile, is a DataError at its line."""
    keys: dict[str, str | None] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        problem = (
            "expected `KEY` or `KEY PROFILE`"
            if len(words) > 2
            else f"the key is shorter than {MIN_KEY_LENGTH} characters"
            if len(words[0]) < MIN_KEY_LENGTH
            else "the key is listed twice"
            if words[0] in keys
            else f"profile {words[1]!r} is not in `profiles` ({', '.join(profiles) or 'none'})"
            if len(words) == 2 and words[1] not in profiles
            else None
        )
        if problem:
            raise DataError(
                path, number, None, problem, "e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        keys[words[0]] = words[1] if len(words) == 2 else None
    if not keys:
        raise DataError(path, None, None, "holds no key", "write one `KEY` or `KEY PROFILE` per line")
    return keys


class BearerAuth:
    """ASGI middleware: every path but `open_paths` needs `Authorization: Bearer KEY` with a listed key
    (compared in constant time, with every key), else 401; `request.state.key_profile` is the key's profile."""

    def __init__(
        self, app: ASGIApp, keys: Mapping[str, str | None], open_paths: Collection[str] = ("/health",)
    ) -> None:
        self.app, self.open_paths = app, open_paths
        self.keys = [(key.encode(), profile) for key, profile in keys.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        found, profile = False, None
        for key, bound in self.keys:  # no early exit: the time does not tell which key came close
            if hmac.compare_digest(token.strip(), key):
                found, profile = True, bound
        if not found or scheme.lower() != b"bearer":
            return await ApiError(
                401,
                "a valid API key is required: send `Authorization: Bearer KEY`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ).response()(scope, receive, send)
        scope.setdefault("state", {})["key_profile"] = profile
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or sent) is answered 413, and one that is not UTF-8
    400 `invalid_json`, before any handler reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = ApiError(
            413, f"the request body exceeds limits.max_request_bytes={self.max_bytes}", code="request_too_large"
        ).response
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await too_large()(scope, receive, send)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            return await ApiError(
                400, f"the body is not valid JSON: invalid UTF-8 at byte {error.start}", code="invalid_json"
            ).response()(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def param_path(location: tuple) -> str | None:
    """`("body", "messages", 0, "role")` → `messages[0].role`."""
    text = ""
    for part in location[1:] if location and location[0] == "body" else location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


async def answer(
    service: Service, job: GenerationJob, events: JobEvents, request: Request, reply: OpenAIReply, stream: bool
) -> Any:
    """Run a generation job and answer with `reply`: its completion, or its SSE stream. Until the response
    starts, a disconnect cancels the job (a stream's response then listens itself); errors before the first
    event still get their HTTP status."""
    service.engine.submit(job)
    watcher = asyncio.create_task(cancel_on_disconnect(request.receive, job, events))
    streaming = False  # once the stream is handed over, it cancels the job when it ends
    try:
        first = await events.next()
        if stream:
            streaming = True
            return StreamingResponse(
                reply.stream(job, events, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        event = first
        while event is not None:
            for delta in event:
                reply.push(delta)
            event = await events.next()
        return reply.completion()
    finally:
        watcher.cancel()
        if not streaming:
            job.cancel()


class OpenAIReply(abc.ABC):
    """What OpenAI-shaped answers share: the envelope (`id`, `object`, `created`, `model`), `usage`, SSE chunks,
    and a stream that always ends with `[DONE]` (an error once the headers are sent travels as an event) and
    cancels its job when it ends. Subclasses hold the choices (`push`, `completion`, `chunks`)."""

    kind: str  # a completion's `object`
    chunk_kind: str  # a streamed chunk's

    def __init__(
        self, prefix: str, request_id: str, model: str, prompt_tokens: int, stream_options: StreamOptions | None
    ) -> None:
        self.id, self.created = f"{prefix}-{request_id.removeprefix('req_')}", int(time.time())
        self.model, self.prompt_tokens = model, prompt_tokens
        self.include_usage = bool(stream_options and stream_options.include_usage)

    @abc.abstractmethod
    def push(self, delta: Delta) -> object:
        """Add a delta to its choice (returning what a chunk of it needs)."""

    @abc.abstractmethod
    def completion(self) -> dict:
        """The whole answer, once every choice has finished."""

    @abc.abstractmethod
    def completion_tokens(self) -> int:
        """Tokens the choices have generated so far."""

    @abc.abstractmethod
    def chunks(self, events: JobEvents, first: list) -> AsyncIterator[str]:
        """The SSE chunks of the choices, from the job's first event to its end."""

    def usage(self) -> dict:
        completion = self.completion_tokens()
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = self.envelope(self.chunk_kind, choices)
        if self.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def stream(self, job: GenerationJob, events: JobEvents, first: list) -> AsyncIterator[str]:
        try:
            async for chunk in self.chunks(events, first):
                yield chunk
            if self.include_usage:
                yield self.chunk([], self.usage())
        except ApiError as error:  # the headers are sent: the error travels as an event
            yield f"data: {json.dumps(error.body)}\n\n"
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"
