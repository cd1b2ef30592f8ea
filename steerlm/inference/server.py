"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) with SteerLM's `attributes` extension.

    POST /v1/chat/completions   OpenAI's chat schema (messages, temperature, top_p, max_tokens, n, stop,
                                seed, stream over SSE) plus `attributes` ({"humor": 3}) and `top_k`
    GET  /v1/models             the served model, with its attribute schema and defaults
    POST /v1/attributes/score   APM scores of a conversation's last (assistant) message, with apm_checkpoint
    GET  /health                200 while the engine runs, 503 once it stops

Handlers run on the event loop and never touch the model: they build prompts (`Steering`), submit a job
to the engine and await its events. Every error is OpenAI-shaped JSON, `{"error": {"message", "type",
"param", "code"}}`: 400 bad values, 404 unknown model or path, 413 body over limits.max_request_bytes,
422 a body that does not fit the schema, 429 queue full, 503 shutting down or overloaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerlm.config.inference import ServeConfig
from steerlm.errors import DataError
from steerlm.evaluation.apm_metrics import REWARD
from steerlm.inference.engine import (
    Batching,
    EngineBusy,
    EngineClosed,
    GenerationJob,
    QueueTimeout,
    ScoringJob,
    Service,
    model_name,
    serving,
)
from steerlm.inference.steering import ChatMessage, RequestError, ResponseText, sampling_params

log = logging.getLogger(__name__)
# Fields of OpenAI's schema this server cannot honour: refused when set, rather than silently ignored.
UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
    "verbosity",
)
UNSET: tuple[object, ...] = (None, False, 0, [], {}, {"type": "text"})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    role: str
    content: str | list[TextPart]

    def message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ChatMessage(self.role, text)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    messages: list[MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    attributes: dict[str, Any] | None = None  # SteerLM: attribute name → value (null: unset a default)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[MessageIn] = Field(min_length=1)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def api_error(error: BaseException) -> ApiError:
    """The HTTP face of anything a request can run into."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        return ApiError(400, error.message, param=error.param, code=error.code)
    if isinstance(error, EngineBusy):
        return ApiError(429, str(error), "rate_limit_error", code="queue_full")
    if isinstance(error, (EngineClosed, QueueTimeout)):
        return ApiError(503, str(error), "server_error", code="unavailable")
    if isinstance(error, (DataError, ValueError)):  # the generator's or scorer's checks of one request
        return ApiError(400, str(error), code="invalid_request")
    log.error("request failed", exc_info=error)
    return ApiError(500, f"internal error: {error}", "server_error", code="internal_error")


class JobEvents:
    """A job's sink: hands engine events to the event loop (the engine thread must never block)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    def __call__(self, event: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self) -> Any:
        event = await self.queue.get()
        if isinstance(event, BaseException):
            raise api_error(event)
        return event


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or sent) is answered 413 before any handler reads it."""

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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _param(location: tuple) -> str | None:
    """`("body", "messages", 0, "role")` → `messages[0].role`."""
    text = ""
    for part in location[1:] if location and location[0] == "body" else location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


class ChatCompletions:
    """POST /v1/chat/completions: request → prompt and sampling rows → a generation job → the response."""

    def __init__(self, service: Service, cfg: ServeConfig, name: str) -> None:
        self.service, self.cfg, self.name = service, cfg, name

    def _job(self, body: ChatCompletionRequest, events: JobEvents) -> tuple[GenerationJob, int, dict]:
        limits = self.cfg.limits
        if body.model != self.name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        for key in UNSUPPORTED:
            if (body.model_extra or {}).get(key) not in UNSET:
                raise ApiError(
                    400,
                    f"{key} is not supported by this server (it steers responses with the `attributes` object)",
                    param=key,
                    code="unsupported_parameter",
                )
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens} (limits.max_tokens)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if body.n > limits.max_n:
            raise ApiError(
                400,
                f"n={body.n} exceeds this server's limit of {limits.max_n} (limits.max_n)",
                param="n",
                code="n_too_large",
            )
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop is not None and not all(stop):
            raise ApiError(400, "stop strings must not be empty", param="stop", code="invalid_stop")
        steering = self.service.steering
        labels = steering.labels(body.attributes)
        system, turns = steering.conversation([m.message() for m in body.messages], labels)
        prompt = steering.prompt_ids(system, turns, labels)
        params = sampling_params(
            self.cfg.sampling,
            body.n,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=stop,
            seed=body.seed,
        )
        return GenerationJob(sink=events, prompts=[prompt] * body.n, params=params), len(prompt), labels or {}

    async def __call__(self, body: ChatCompletionRequest) -> Any:
        events = JobEvents()
        job, prompt_tokens, labels = self._job(body, events)
        self.service.engine.submit(job)
        try:
            first = await events.next()  # errors before the first token still get their HTTP status
        except BaseException:
            job.cancel()
            raise
        reply = Reply(self, body, prompt_tokens, labels)
        if body.stream:
            return StreamingResponse(
                reply.stream(job, events, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            event = first
            while event is not None:
                for delta in event:
                    reply.rows[delta.index].push(delta)
                event = await events.next()
        finally:
            job.cancel()
        return reply.completion()


class Reply:
    """One request's choices as they grow, rendered as a completion or as SSE chunks."""

    def __init__(self, route: ChatCompletions, body: ChatCompletionRequest, prompt_tokens: int, labels: dict) -> None:
        suffix = route.service.steering.template.config.turn_suffix
        self.rows = [ResponseText(suffix) for _ in range(body.n)]
        self.name, self.labels = route.name, labels
        self.prompt_tokens = prompt_tokens
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self) -> dict:
        completion = sum(row.tokens for row in self.rows)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": choices}

    def completion(self) -> dict:
        choices = []
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                raise RuntimeError(f"choice {i} has no finish reason: its job ended before the row finished")
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": row.text},
                    "logprobs": None,
                    "finish_reason": row.finish_reason.value,
                }
            )
        return {**self._envelope("chat.completion", choices), "usage": self.usage(), "attributes": self.labels}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = self._envelope("chat.completion.chunk", choices)
        if self.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def stream(self, job: GenerationJob, events: JobEvents, first: list) -> AsyncIterator[str]:
        try:
            yield self._chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(self.rows))
                ]
            )
            event = first
            while event is not None:
                texts, finishes = [], []  # a chunk holds one entry per choice: text first, its finish after
                for delta in event:
                    text = self.rows[delta.index].push(delta)
                    if text:
                        texts.append(
                            {"index": delta.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
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
                        yield self._chunk(choices)
                event = await events.next()
            if self.include_usage:
                yield self._chunk([], self.usage())
        except ApiError as error:  # the headers are sent: the error travels as an event
            yield f"data: {json.dumps(error.body)}\n\n"
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"


def create_app(service: Service, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app over a running engine (rank 0)."""
    name = model_name(cfg.server.model_name, cfg.checkpoint)
    steering, created = service.steering, int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "serving %r on http://%s:%d (schema %s, %d attributes)",
            name,
            cfg.server.host,
            cfg.server.port,
            steering.schema.name,
            len(steering.schema.attributes),
        )
        yield
        log.info("shutting down: finishing queued requests")

    app = FastAPI(title="steerlm", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_request_bytes)

    async def _error(_, error: Exception) -> JSONResponse:
        return api_error(error).response()

    # Expected failures (a request's own, or the engine's state) are answered without a traceback; only
    # the `Exception` handler (a bug) logs one.
    for kind in (ApiError, ValueError, RuntimeError, Exception):
        app.add_exception_handler(kind, _error)

    @app.exception_handler(HTTPException)
    async def _http(_, error: HTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "http_error"
        return ApiError(error.status_code, str(error.detail), code=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(
                400,
                f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                code="invalid_json",
            ).response()
        param = _param(tuple(first.get("loc", ())))
        return ApiError(422, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value").response()

    def model_card() -> dict:
        schema = steering.schema
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "steerlm",
            "attributes": {
                "schema": schema.name,
                "names": list(schema.attributes),
                "min_value": schema.min_value,
                "max_value": schema.max_value,
                "integer": schema.integer,
                "conditioned": steering.conditioned,
                "defaults": steering.defaults,
            },
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = service.engine
        body = {
            "status": "ok" if engine.healthy else "unavailable",
            "queued": engine.queued,
            "batches": engine.batches,
            "rows": engine.rows,
        }
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id != name:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    app.post("/v1/chat/completions")(ChatCompletions(service, cfg, name).__call__)

    @app.post("/v1/attributes/score")
    async def score(body: ScoreRequest) -> dict:
        schema = service.scorer_schema
        if schema is None:
            raise ApiError(
                404,
                "no attribute model is configured: start the server with apm_checkpoint=<APM run directory>",
                code="scoring_not_configured",
            )
        events = JobEvents()
        job = ScoringJob(
            sink=events, conversations=[steering.scoring_conversation([m.message() for m in body.messages])]
        )
        service.engine.submit(job)
        try:
            scores = (await events.next())[0]
        finally:
            job.cancel()
        reward = scores.pop(REWARD, None)
        return {"object": "attribute_scores", "scores": scores, "labels": schema.clip_round(scores), "reward": reward}

    return app


def serve(cfg: ServeConfig) -> None:
    """Load, serve until SIGINT/SIGTERM, then finish in-flight requests (up to server.shutdown_timeout_s),
    the queue, and release the other ranks."""
    batching = Batching(cfg.limits.max_batch_size, cfg.limits.max_queue, cfg.limits.request_timeout_s)
    with serving(cfg, batching, cfg.apm_checkpoint) as service:
        if service is None:  # another tensor-parallel rank: it followed rank 0 until rank 0 closed
            return
        config = uvicorn.Config(
            create_app(service, cfg),
            host=cfg.server.host,
            port=cfg.server.port,
            timeout_graceful_shutdown=int(cfg.server.shutdown_timeout_s),
            log_level="warning",
        )
        with _stop_on_signal():
            uvicorn.Server(config).run()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextmanager
def _stop_on_signal() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it found.
    With the default handler that kills the process before the engine drains and the other ranks are
    released; this handler ends `run` with an exception instead, so the cleanup runs and the exit is 0."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stop as stop:
        log.info("stopped by %s", stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
