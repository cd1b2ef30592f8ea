"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) with SteerLM's `attributes` extension.

    POST /v1/chat/completions   OpenAI's chat schema (messages, temperature, top_p, max_tokens, n, stop,
                                seed, logprobs, stream over SSE) plus `attributes` ({"humor": 3}) and `top_k`
    POST /v1/completions        OpenAI's text completions of raw prompts, with `echo` and prompt logprobs
                                (what lm-evaluation-harness scores with); no attributes
    PUT  /generate              NeMo's text-generation API (`steerlm.inference.nemo_api`)
    GET  /v1/models             the served model, with its attribute schema and defaults
    POST /v1/attributes/score   APM scores of a conversation's last (assistant) message, with apm_checkpoint
    GET  /health                200 while the engine runs, 503 once it stops

Handlers run on the event loop and never touch the model: they check the request in full (so a bad one
fails alone, before it joins a batch), build prompts (`Steering`), submit a job to the engine and await its
events; a client that disconnects cancels its job. Every error is OpenAI-shaped JSON, `{"error":
{"message", "type", "param", "code"}}`: 400 bad values, 404 unknown model or path, 413 body over
limits.max_request_bytes, 422 a body that does not fit the schema, 429 queue full (with Retry-After), 500
an internal error (with the request id), 503 shutting down, overloaded or past limits.request_timeout_s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from steerlm.config.inference import BatchingPolicy, ServeConfig
from steerlm.data.attributes import Labels
from steerlm.evaluation.apm_metrics import REWARD
from steerlm.inference.completions_api import CompletionRequest, TextReply, completion_job
from steerlm.inference.engine import Batching, Engine, GenerationJob, ScoringJob, Service, model_name, serving
from steerlm.inference.generate import Delta, TokenLogprob
from steerlm.inference.http_api import (
    LEAST_LOGPROB,
    ApiError,
    BearerAuth,
    BodyLimit,
    JobEvents,
    RequestIds,
    StreamOptions,
    api_error,
    cancel_on_disconnect,
    check_stop_strings,
    check_unsupported,
    param_path,
    read_api_keys,
)
from steerlm.inference.nemo_api import NemoGenerateRequest, nemo_job, nemo_response
from steerlm.inference.steering import ChatMessage, ResponseText, sampling_params
from steerlm.tokenizers import Tokenizer

log = logging.getLogger(__name__)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    role: str
    content: str | list[TextPart]

    def message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ChatMessage(self.role, text)


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
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    attributes: dict[str, Any] | None = None  # SteerLM: attribute name → value (null: unset a default)
    profile: str | None = None  # SteerLM: a configured profile (or "model": "<model>:<profile>")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[MessageIn] = Field(min_length=1)


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

    def _profile(self, body: ChatCompletionRequest, key_profile: str | None) -> Profile:
        """The profile a request uses: named by `model` (`<model>:<profile>`) or `profile`, else its API key's.
        A key bound to a profile may not use another."""
        model, colon, named = body.model.partition(":")
        if model != self.name or (colon and not named):
            ids = ", ".join(self.name + (f":{p}" if p else "") for p in self.profiles)
            message = f"model {body.model!r} does not exist; this server serves {ids}"
            raise ApiError(404, message, param="model", code="model_not_found")
        if named and body.profile and named != body.profile:
            message = f"model names profile {named!r} but profile is {body.profile!r}"
            raise ApiError(400, message, param="profile", code="conflicting_profile")
        chosen = named or body.profile
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
        limits = self.cfg.limits
        profile = self._profile(body, key_profile)
        check_unsupported(body.model_extra)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > profile.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {profile.max_tokens} "
                f"({profile.caps}.max_tokens)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if body.n > profile.max_n:
            raise ApiError(
                400,
                f"n={body.n} exceeds this server's limit of {profile.max_n} ({profile.caps}.max_n)",
                param="n",
                code="n_too_large",
            )
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop is not None:
            check_stop_strings(stop, limits, "stop", "stop strings")
        steering = self.service.steering
        labels = steering.labels(body.attributes, base=profile.labels)
        system, turns = steering.conversation(
            [m.message() for m in body.messages], labels, system_prompt=profile.system_prompt
        )
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
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs,
        )
        job = GenerationJob(sink=events, request_id=events.request_id, prompts=[prompt] * body.n, params=params)
        return job, len(prompt), labels or {}

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> Any:
        events = JobEvents(request.state.request_id)
        job, prompt_tokens, labels = self._job(body, events, getattr(request.state, "key_profile", None))
        reply = Reply(self, body, prompt_tokens, labels, events.request_id)
        return await answer(self.service, job, events, request, reply, body.stream)


async def answer(
    service: Service, job: GenerationJob, events: JobEvents, request: Request, reply: Any, stream: bool
) -> Any:
    """Run a generation job and answer with `reply` (`push(delta)`, `completion()`, `stream(job, events,
    first)`): its completion, or its SSE stream. Until the response starts, a disconnect cancels the job (a
    stream's response then listens itself); errors before the first event still get their HTTP status."""
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


class Reply:
    """One request's choices as they grow, rendered as a completion or as SSE chunks."""

    def __init__(
        self, route: ChatCompletions, body: ChatCompletionRequest, prompt_tokens: int, labels: dict, request_id: str
    ) -> None:
        suffix = route.service.steering.template.config.turn_suffix
        self.rows = [ResponseText(suffix) for _ in range(body.n)]
        self.tokenizer = route.service.steering.tokenizer
        self.logprobs: list[list[dict]] | None = [[] for _ in range(body.n)] if body.logprobs else None
        self.name, self.labels = body.model, labels
        self.prompt_tokens = prompt_tokens
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.id, self.created = f"chatcmpl-{request_id.removeprefix('req_')}", int(time.time())

    def usage(self) -> dict:
        completion = sum(row.tokens for row in self.rows)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

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
                    "logprobs": None if self.logprobs is None else self._logprobs(self.logprobs[i]),
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
                        yield self._chunk(choices)
                event = await events.next()
            if self.include_usage:
                yield self._chunk([], self.usage())
        except ApiError as error:  # the headers are sent: the error travels as an event
            yield f"data: {json.dumps(error.body)}\n\n"
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"


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


def create_app(service: Service, cfg: ServeConfig, api_keys: Mapping[str, str | None] | None = None) -> FastAPI:
    """The FastAPI app over a running engine (rank 0); with `api_keys` (key → bound profile or None), every
    path but /health needs one of them."""
    name = model_name(cfg.server.model_name, cfg.checkpoint)
    steering, created = service.steering, int(time.time())
    completions = ChatCompletions(service, cfg, name)

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
    if api_keys is not None:
        app.add_middleware(BearerAuth, keys=api_keys)  # before the body is read
    app.add_middleware(RequestIds)  # outermost: every answer, 401 and 413 included, carries the id

    async def _error(request: Request, error: Exception) -> JSONResponse:
        return api_error(error, request.state.request_id).response()

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
        param = param_path(tuple(first.get("loc", ())))
        return ApiError(422, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value").response()

    def model_card(profile: Profile) -> dict:
        schema = steering.schema
        card = {
            "id": name + (f":{profile.name}" if profile.name else ""),
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
                "defaults": profile.labels,
            },
        }
        if profile.name:
            card["profile"] = {
                "name": profile.name,
                "system_prompt": profile.system_prompt,
                "max_tokens": profile.max_tokens,
                "max_n": profile.max_n,
            }
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = service.engine
        body = {
            "status": "ok" if engine.healthy else "unavailable",
            "queued": engine.queued,
            "running": engine.running,
            "requests": engine.requests,
            "rows": engine.rows,
            "steps": engine.steps,
        }
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        """The served model, and the model as each profile serves it (`<model>:<profile>`)."""
        return {"object": "list", "data": [model_card(profile) for profile in completions.profiles.values()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        cards = {card["id"]: card for card in (model_card(p) for p in completions.profiles.values())}
        if model_id not in cards:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server serves {', '.join(cards)}",
                param="model",
                code="model_not_found",
            )
        return cards[model_id]

    app.post("/v1/chat/completions")(completions.__call__)

    def refuse_profile_keys(request: Request) -> None:
        """Routes that take raw prompts: a raw prompt carries its own attribute line (or none)."""
        if getattr(request.state, "key_profile", None) is not None:
            raise ApiError(
                403,
                "this API key is bound to a profile, whose attributes a raw prompt would bypass: use "
                "/v1/chat/completions",
                "permission_error",
                code="profile_not_allowed",
            )

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI's text completions (`steerlm.inference.completions_api`): raw prompts, scored with `echo`."""
        refuse_profile_keys(request)
        if body.model != name:
            message = (
                f"model {body.model!r} does not exist on this route; it serves {name!r} (raw prompts take no profile)"
            )
            raise ApiError(404, message, param="model", code="model_not_found")
        text = completion_job(body, cfg, steering.tokenizer, steering.max_prompt_tokens)
        events = JobEvents(request.state.request_id)
        reply = TextReply(body, text, steering.tokenizer, events.request_id)
        return await answer(service, text.job(events, body.n), events, request, reply, body.stream)

    @app.put("/generate")
    async def nemo_generate(body: NemoGenerateRequest, request: Request) -> dict:
        """NeMo's text-generation API (`steerlm.inference.nemo_api`): raw prompts, NeMo's answer."""
        refuse_profile_keys(request)
        prompts, params = nemo_job(body, cfg, steering.tokenizer, steering.max_prompt_tokens)
        events = JobEvents(request.state.request_id)
        job = GenerationJob(sink=events, request_id=events.request_id, prompts=prompts, params=params)
        service.engine.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request.receive, job, events))
        rows: list[list[Delta]] = [[] for _ in prompts]
        try:
            while (event := await events.next()) is not None:
                for delta in event:
                    rows[delta.index].append(delta)
        finally:
            watcher.cancel()
            job.cancel()
        return nemo_response(steering.tokenizer, body.sentences, prompts, rows)

    @app.post("/v1/attributes/score")
    async def score(body: ScoreRequest, request: Request) -> dict:
        schema = service.scorer_schema
        if schema is None:
            raise ApiError(
                404,
                "no attribute model is configured: start the server with apm_checkpoint=<APM run directory>",
                code="scoring_not_configured",
            )
        events = JobEvents(request.state.request_id)
        job = ScoringJob(
            sink=events,
            request_id=events.request_id,
            conversations=[steering.scoring_conversation([m.message() for m in body.messages])],
        )
        service.engine.submit(job)
        try:
            scores = (await events.next())[0]
        finally:
            job.cancel()
        reward = scores.pop(REWARD, None)
        return {"object": "attribute_scores", "scores": scores, "labels": schema.clip_round(scores), "reward": reward}

    return app


SHUTDOWN_MARGIN_S = 5.0  # after the engine's grace, time for the last answers to be written before uvicorn cuts


class _Server(uvicorn.Server):
    """uvicorn's server, which on shutdown first gives the engine `grace_s` to finish its jobs: past it they
    fail with a JSON 503 (or an error event and `[DONE]` on a stream) before uvicorn's own grace runs out."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain(self.grace_s)
        await super().shutdown(sockets)


def serve(cfg: ServeConfig) -> None:
    """Load, serve until SIGINT/SIGTERM, then finish in-flight requests (up to server.shutdown_timeout_s),
    and release the other ranks. If the engine stops on an error (the ranks fell out of step), the server
    stops too and this raises, so every rank exits non-zero."""
    batching = Batching(
        cfg.limits.max_batch_size,
        cfg.limits.max_queue,
        cfg.limits.request_timeout_s,
        continuous=cfg.limits.batching == BatchingPolicy.continuous,
    )
    api_keys = read_api_keys(cfg.api_keys, cfg.profiles) if cfg.api_keys is not None else None
    profile_attributes = {name: profile.attributes for name, profile in cfg.profiles.items()}
    with serving(cfg, batching, cfg.apm_checkpoint, profile_attributes) as service:
        if service is None:  # another tensor-parallel rank: it followed rank 0 until rank 0 closed
            return
        grace_s = cfg.server.shutdown_timeout_s
        config = uvicorn.Config(
            create_app(service, cfg, api_keys),
            host=cfg.server.host,
            port=cfg.server.port,
            timeout_graceful_shutdown=int(grace_s + SHUTDOWN_MARGIN_S),
            log_level="warning",
        )
        server = _Server(config, service.engine, grace_s)
        service.engine.on_failure = lambda error: setattr(server, "should_exit", True)
        with _stop_on_signal():
            server.run()
        if service.engine.failure is not None:
            raise RuntimeError(f"serving stopped: {service.engine.failure}") from service.engine.failure


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
