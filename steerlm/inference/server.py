"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) with SteerLM's `attributes` extension.

    POST /v1/chat/completions   OpenAI's chat schema (messages, temperature, top_p, max_tokens, n, stop,
                                seed, logprobs, stream over SSE) plus `attributes` ({"humor": 3}) and `top_k`
    POST /v1/completions        OpenAI's text completions of raw prompts, with `echo` and prompt logprobs
                                (what lm-evaluation-harness scores with); no attributes
    PUT  /generate              NeMo's text-generation API (`steerlm.inference.nemo_api`)
    GET  /v1/models             the served model, with its attribute schema and defaults
    POST /v1/attributes/score   APM scores of a conversation's last (assistant) message, with apm_checkpoint
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer routes (`tokenize_api`)
    GET  /health                200 while the engine runs, 503 once it stops
    GET  /metrics               Prometheus metrics: requests, tokens and latencies by route and profile
                                (`steerlm.inference.metrics`); with API keys, it needs one like every route but
                                /health

Handlers run on the event loop and never touch the model: they check the request in full (so a bad one
fails alone, before it joins a batch), build prompts (`Steering`), submit a job to the engine and await its
events; a client that disconnects cancels its job. Every error is OpenAI-shaped JSON, `{"error":
{"message", "type", "param", "code"}}`: 400 bad values, 404 unknown model or path, 413 body over
limits.max_request_bytes, 422 a body that does not fit the schema, 429 queue full (with Retry-After), 500
an internal error (with the request id), 503 shutting down, overloaded or past limits.request_timeout_s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from steerlm.config.inference import BatchingPolicy, ServeConfig
from steerlm.evaluation.apm_metrics import REWARD
from steerlm.inference import metrics
from steerlm.inference.chat_api import ChatCompletions, MessageIn, Profile
from steerlm.inference.completions_api import CompletionRequest, TextReply, completion_job, string_prompt_ids
from steerlm.inference.engine import Batching, Engine, GenerationJob, ScoringJob, Service, model_name, serving
from steerlm.inference.generate import Delta
from steerlm.inference.http_api import (
    ApiError,
    BearerAuth,
    BodyLimit,
    JobEvents,
    RequestIds,
    answer,
    api_error,
    cancel_on_disconnect,
    param_path,
    read_api_keys,
)
from steerlm.inference.nemo_api import NemoGenerateRequest, nemo_job, nemo_response
from steerlm.inference.tokenize_api import DetokenizeRequest, TokenizeRequest, detokenized, tokenized, tokenizer_info

log = logging.getLogger(__name__)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[MessageIn] = Field(min_length=1)


def create_app(service: Service, cfg: ServeConfig, api_keys: Mapping[str, str | None] | None = None) -> FastAPI:
    """The FastAPI app over a running engine (rank 0); with `api_keys` (key → bound profile or None), every
    path but /health needs one of them."""
    name = model_name(cfg.server.model_name, cfg.checkpoint)
    steering, created = service.steering, int(time.time())
    chat = ChatCompletions(service, cfg, name)

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
                # per attribute, how many of the attribute lines the model trained on carry each value (null: its
                # run recorded none); a value missing here was never asked of it in training
                "trained_values": None if steering.trained is None else steering.trained.levels,
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

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        engine = service.engine
        gauges = {metrics.WAITING: engine.queued, metrics.RUNNING: engine.running, metrics.HEALTHY: engine.healthy}
        return Response(engine.metrics.render(gauges), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        """The served model, and the model as each profile serves it (`<model>:<profile>`)."""
        return {"object": "list", "data": [model_card(profile) for profile in chat.profiles.values()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        cards = {card["id"]: card for card in (model_card(p) for p in chat.profiles.values())}
        if model_id not in cards:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server serves {', '.join(cards)}",
                param="model",
                code="model_not_found",
            )
        return cards[model_id]

    app.post("/v1/chat/completions")(chat.__call__)

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
        profile, adapter = served(body.model)
        text = completion_job(body, cfg, steering.tokenizer, steering.max_prompt_tokens)
        events = JobEvents(request.state.request_id)
        reply = TextReply(body, text, steering.tokenizer, events.request_id)
        return await answer(service, text.job(events, body.n, profile, adapter), events, request, reply, body.stream)

    def served(model: str | None) -> tuple[str, int]:
        """A raw-text route's `model`, when given: the served model's name (the model alone), or
        `<model>:<profile>` of a profile with a LoRA adapter, whose weights its rows then use; returns (profile,
        adapter index). A raw prompt carries its own attribute line, so a profile's attributes and system prompt
        have no place here: a profile without an adapter names the served model alone, and is refused."""
        if model is None or model == name:
            return "", 0
        base, _, profile = model.partition(":")
        if base == name and profile in service.adapters:
            return profile, service.adapters[profile]
        ids = ", ".join([name, *(f"{name}:{p}" for p in chat.profiles if p in service.adapters)])
        problem = (
            f"profile {profile!r} has no LoRA adapter, and raw text takes no profile's attributes"
            if base == name and profile in chat.profiles
            else f"model {model!r} does not exist on this route"
        )
        raise ApiError(404, f"{problem}; it serves {ids}", param="model", code="model_not_found")

    max_model_len = steering.max_prompt_tokens + 1

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        """vLLM's `/tokenize` (`steerlm.inference.tokenize_api`): a prompt's ids, or a chat's prompt ids."""
        if body.form() == "prompt":
            served(body.model)
            ids = string_prompt_ids(steering.tokenizer, body.prompt or "", body.add_special_tokens is not False)
        else:
            assert body.model is not None and body.messages is not None  # form() checked them
            profile = chat.profile_of(body.model, body.profile, getattr(request.state, "key_profile", None))
            ids, _ = chat.prompt(body.messages, body.attributes, profile)
        return tokenized(ids, max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        served(body.model)
        return detokenized(steering.tokenizer, body)

    @app.get("/tokenizer_info")
    async def tokenizer_information() -> dict:
        return tokenizer_info(steering.tokenizer, max_model_len)

    @app.put("/generate")
    async def nemo_generate(body: NemoGenerateRequest, request: Request) -> dict:
        """NeMo's text-generation API (`steerlm.inference.nemo_api`): raw prompts, NeMo's answer."""
        refuse_profile_keys(request)
        prompts, params = nemo_job(body, cfg, steering.tokenizer, steering.max_prompt_tokens)
        events = JobEvents(request.state.request_id)
        job = GenerationJob(
            sink=events, request_id=events.request_id, route="nemo_generate", prompts=prompts, params=params
        )
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
        return nemo_response(steering.tokenizer, body, prompts, rows)

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
            route="score",
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
        prefill_tokens=cfg.limits.prefill_tokens,
    )
    api_keys = read_api_keys(cfg.api_keys, cfg.profiles) if cfg.api_keys is not None else None
    profile_attributes = {name: profile.attributes for name, profile in cfg.profiles.items()}
    adapters = {name: profile.adapter for name, profile in cfg.profiles.items() if profile.adapter is not None}
    with serving(cfg, batching, cfg.apm_checkpoint, profile_attributes, adapters) as service:
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
