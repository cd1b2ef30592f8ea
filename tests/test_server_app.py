"""The HTTP server as clients meet it, over an engine whose decoding is scripted (no model; steps run when a
test allows them): every request is checked in full before it joins a batch; 429 says when to retry; a 500
carries the request id, not the error; a client that goes away (streaming or not) stops its row at the next
step; a short stream gets `[DONE]` while a long one decodes; deadlines and the shutdown grace end requests
with JSON errors and streams with an error event and `[DONE]`."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from steerlm.config.inference import ProfileConfig, SamplingDefaults, ServeConfig, ServeLimits, ServerOptions
from steerlm.data.attribute_lines import AttributeLines
from steerlm.errors import DataError
from steerlm.inference.engine import Engine, Job, Service
from steerlm.inference.http_api import read_api_keys
from steerlm.inference.server import create_app
from tests.multiproc import _free_port
from tests.test_chat import FakeService, ScriptedEngine
from tests.test_engine import ScriptedDecoding, ScriptedLockstep

MESSAGES = [{"role": "user", "content": "what does zog eat"}]


class AppServer:
    """`create_app` over an engine with a scripted decoding, served by uvicorn on a thread (loopback only).
    `jobs` records every submitted job; `cancelled[i]` is set when job i is cancelled."""

    def __init__(self, cfg: ServeConfig, gated: bool, api_keys: dict[str, str | None] | None = None) -> None:
        self.decoding = ScriptedDecoding(gated)
        limits = cfg.limits
        self.engine = Engine(
            ScriptedLockstep(self.decoding),  # type: ignore[arg-type]
            limits.max_batch_size,
            limits.max_queue,
            limits.request_timeout_s,
            ping_interval_s=30,
        ).start()
        self.jobs: list[Job] = []
        self.cancelled: list[threading.Event] = []
        submit = self.engine.submit

        def recorded(job: Job) -> None:
            event, cancel = threading.Event(), job.cancel
            job.cancel = lambda: (cancel(), event.set())  # type: ignore[method-assign]
            self.jobs.append(job)
            self.cancelled.append(event)
            submit(job)

        self.engine.submit = recorded  # type: ignore[method-assign]
        self.steering = FakeService(ScriptedEngine([]), {"coherence": 3}).steering
        presets = {
            name: self.steering.preset(profile.attributes, self.steering.defaults, f"profiles.{name}.attributes")
            for name, profile in cfg.profiles.items()
        }
        # a profile's adapter as serving() indexes it (the scripted decoding runs no model, so none is loaded)
        adapters = {name: i + 1 for i, name in enumerate(n for n, p in cfg.profiles.items() if p.adapter)}
        service = Service(self.engine, self.steering, None, None, presets, adapters)  # type: ignore[arg-type]
        app = create_app(service, cfg, api_keys)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _until(lambda: self.server.started)

    def close(self) -> None:
        if self.decoding.permits is not None:
            self.decoding.permits.release(1000)
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()

    def post(
        self, body: dict | bytes, headers: dict | None = None, method: str = "POST", path: str = "/v1/chat/completions"
    ) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of POST /v1/chat/completions (or `method` `path`)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response.headers  # type: ignore[return-value]

    def open(self, body: dict, path: str = "/v1/chat/completions") -> http.client.HTTPConnection:
        """A request sent, whose answer the test reads (`getresponse()`, once steps ran) or abandons."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return connection

    def metrics(self, headers: dict | None = None) -> dict[tuple, float]:
        """GET /metrics read by prometheus_client's parser: (sample name, sorted label pairs) → value."""
        from prometheus_client.parser import text_string_to_metric_families

        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", "/metrics", headers=headers or {})
        response = connection.getresponse()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = text_string_to_metric_families(response.read().decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    def in_background(self, body: dict) -> Callable[[], tuple[int, dict, dict]]:
        """POST on a thread; returns a function that waits for the answer."""
        result: list = []
        thread = threading.Thread(target=lambda: result.append(self.post(body)), daemon=True)
        thread.start()

        def wait() -> tuple[int, dict, dict]:
            thread.join(timeout=60)
            return result[0]

        return wait


def _labels(*pairs: tuple[str, str], **labels: str) -> tuple:
    """A sample's labels as `AppServer.metrics` keys them."""
    return tuple(sorted([*pairs, *labels.items()]))


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)


def _events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The `data:` payloads of an SSE stream, as they arrive."""
    while line := response.readline():
        if line.startswith(b"data: "):
            yield line[6:].decode().strip()


def _config(profiles: dict[str, ProfileConfig] | None = None, **limits) -> ServeConfig:
    limits = {"max_tokens": 64, "max_batch_size": 4, "max_queue": 4, "max_stop_chars": 40, **limits}
    return ServeConfig(
        checkpoint="unused",
        server=ServerOptions(model_name="tiny"),
        sampling=SamplingDefaults(max_tokens=8),
        limits=ServeLimits(**limits),
        profiles=profiles or {},
    )


@pytest.fixture
def app():
    servers: list[AppServer] = []

    def start(gated: bool = False, profiles=None, api_keys=None, **limits) -> AppServer:
        servers.append(AppServer(_config(profiles, **limits), gated, api_keys))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _ask(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, **fields}


BAD = [
    ({"seed": 2**63}, "seed", "invalid_seed"),
    ({"seed": 2**63 - 2, "n": 3, "temperature": 1.0}, "seed", "invalid_seed"),  # seed + n - 1 past 2**63 - 1
    ({"seed": -1}, "seed", "invalid_seed"),
    ({"top_k": 2**63, "temperature": 1.0}, "top_k", "invalid_top_k"),
    ({"temperature": 1e-310}, "temperature", "invalid_temperature"),  # a denormal: the logits would overflow
    ({"top_p": 5e-324}, "top_p", "invalid_top_p"),
    ({"stop": [f"s{i}" for i in range(5)]}, "stop", "too_many_stop_strings"),
    ({"stop": ["x" * 41]}, "stop", "stop_too_long"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_top_logprobs"),
    ({"attributes": "coherence=3"}, "attributes", "invalid_attribute_string"),  # NeMo's string is name:value,…
    ({"attributes": "coherence:3,coherence:4"}, "attributes.coherence", "invalid_attribute_string"),
    ({"attributes": "coherence:high"}, "attributes.coherence", "invalid_attribute_value"),
    ({"attributes": "wit:2"}, "attributes.wit", "unknown_attribute"),
]


@pytest.mark.parametrize("fields,param,code", BAD, ids=[f"{c}-{i}" for i, (_, _, c) in enumerate(BAD)])
def test_values_the_decoder_cannot_take_are_refused_before_the_request_joins_a_batch(
    app, fields: dict, param: str, code: str
) -> None:
    server = app()
    status, body, _ = server.post(_ask(**fields))
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, param, code), body
    assert server.jobs == [] and server.engine.requests == 0


def test_invalid_utf8_is_invalid_json_and_answers_carry_their_request_id(app) -> None:
    server = app()
    status, body, headers = server.post(b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}')
    assert (status, body["error"]["code"]) == (400, "invalid_json") and "UTF-8" in body["error"]["message"]
    status, body, headers = server.post(_ask(seed=2**63 - 3, n=3, temperature=1.0))  # the largest seed allowed
    assert status == 200 and [c["message"]["content"] for c in body["choices"]] == ["w1 w2 w3 "] * 3
    assert headers["x-request-id"].startswith("req_") and body["id"] == "chatcmpl-" + headers["x-request-id"][4:]


def test_logprobs_come_per_token_in_openais_form_alike_plain_and_streamed(app) -> None:
    server = app()
    tokenizer = server.steering.tokenizer
    status, body, _ = server.post(_ask(max_tokens=3, logprobs=True, top_logprobs=2))
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None and len(content) == body["usage"]["completion_tokens"]

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    # the scripted decoding's token k at -k, alternatives 1 at -1 and 2 at -inf (OpenAI's -9999.0: JSON has no inf)
    assert content == [{**entry(k, -k), "top_logprobs": [entry(1, -1.0), entry(2, -9999.0)]} for k in (1, 2, 3)]
    stream = server.open(_ask(max_tokens=3, logprobs=True, top_logprobs=2, stream=True))
    chunks = [json.loads(p) for p in _events(stream.getresponse()) if p != "[DONE]"]
    choices = [choice for chunk in chunks for choice in chunk["choices"] if choice["logprobs"]]
    streamed = [e for choice in choices for e in choice["logprobs"]["content"]]
    assert streamed == content
    status, body, _ = server.post(_ask(max_tokens=2))
    assert body["choices"][0]["logprobs"] is None  # not asked for
    status, body, _ = server.post(_ask(max_tokens=2, logprobs=True))
    assert [e["top_logprobs"] for e in body["choices"][0]["logprobs"]["content"]] == [[], []]


def test_a_full_queue_says_when_to_retry_and_a_500_names_the_request_not_the_error(app) -> None:
    server = app(gated=True, max_queue=1, max_batch_size=1)
    running = server.in_background(_ask(max_tokens=2))
    server.decoding.wait_in(1)
    waiting = server.in_background(_ask(max_tokens=1))
    _until(lambda: server.engine.queued == 1)
    status, body, headers = server.post(_ask())
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "queue_full", "1")
    server.decoding.fail_step = 2  # the model breaks at step 2: the running request fails, the waiting one not
    server.decoding.permits.release(3)
    status, body, headers = running()
    assert (status, body["error"]["code"]) == (500, "internal_error")
    assert headers["x-request-id"] in body["error"]["message"] and "model broke" not in json.dumps(body)
    assert waiting()[0] == 200
    seen = server.metrics()
    assert seen[("steerlm_requests_rejected_total", _labels(reason="queue_full"))] == 1
    for outcome in ("failed", "completed"):
        assert seen[("steerlm_requests_ended_total", _labels(route="chat", profile="", outcome=outcome))] == 1
    assert seen[("steerlm_request_latency_seconds_count", _labels(route="chat", profile=""))] == 1  # the completed


def test_a_dropped_stream_or_request_stops_its_row_at_the_next_step(app) -> None:
    server = app(gated=True)
    stream = server.open(_ask(max_tokens=50, stream=True))
    server.decoding.permits.release()
    assert json.loads(next(_events(stream.getresponse())))["choices"][0]["delta"]["role"] == "assistant"
    server.decoding.wait_in(2)  # step 2 is under way
    stream.close()  # the client goes away mid-stream
    assert server.cancelled[0].wait(30)
    small = server.in_background(_ask(max_tokens=2))
    _until(lambda: len(server.jobs) == 2)
    server.decoding.permits.release(3)  # step 2 (under way); step 3: row 0 leaves, the small request joins; step 4
    assert small()[0] == 200
    assert server.decoding.steps_of(0) == [1, 2] and server.decoding.log[2]["left"] == [0]
    assert server.decoding.steps_of(1) == [3, 4]  # the next request took its own two steps only
    plain = server.open(_ask(max_tokens=50))
    server.decoding.wait_in(5)
    plain.close()  # a plain request's client goes away before its answer
    assert server.cancelled[2].wait(30)
    server.decoding.permits.release(2)
    _until(lambda: len(server.decoding.log) == 6)
    assert server.decoding.steps_of(2) == [5] and server.decoding.log[5]["left"] == [2]
    seen = server.metrics()
    for outcome, count in (("cancelled", 2), ("completed", 1)):
        assert seen[("steerlm_requests_ended_total", _labels(route="chat", profile="", outcome=outcome))] == count


def test_a_short_stream_gets_done_while_a_long_one_decodes(app) -> None:
    server = app(gated=True)
    long = server.open(_ask(max_tokens=40, stream=True))
    server.decoding.permits.release()
    next(_events(long.getresponse()))
    short = server.open(_ask(max_tokens=2, stream=True))
    _until(lambda: len(server.jobs) == 2)
    server.decoding.permits.release(4)
    payloads = list(_events(short.getresponse()))
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
    assert payloads[-1] == "[DONE]" and text == "w1 w2 "
    assert 0 in server.decoding.live and len(server.decoding.log) <= 5  # the long row is still decoding


def test_deadlines_and_the_shutdown_grace_end_requests_with_json_errors_and_streams_with_done(app) -> None:
    server = app(gated=True, request_timeout_s=60)
    late = server.in_background(_ask(max_tokens=50))
    _until(lambda: len(server.jobs) == 1)
    stream = server.open(_ask(max_tokens=50, stream=True))
    _until(lambda: len(server.jobs) == 2)
    server.decoding.wait_in(1)
    server.jobs[0].submitted -= 120  # past limits.request_timeout_s while decoding
    server.decoding.permits.release(2)
    status, body, _ = late()
    assert (status, body["error"]["code"]) == (503, "request_timeout")
    response = stream.getresponse()
    server.engine.drain(grace_s=0)  # shutting down, and the grace is over
    server.decoding.permits.release(3)
    payloads = list(_events(response))
    assert json.loads(payloads[-2])["error"]["code"] == "unavailable" and payloads[-1] == "[DONE]"
    status, body, _ = server.post(_ask())
    assert (status, body["error"]["code"]) == (503, "unavailable")
    seen = server.metrics()
    for outcome in ("timeout", "failed"):  # the late request's, and the stream's past the grace
        assert seen[("steerlm_requests_ended_total", _labels(route="chat", profile="", outcome=outcome))] == 1
    assert seen[("steerlm_requests_rejected_total", _labels(reason="shutting_down"))] == 1
    assert seen[("steerlm_healthy", ())] == 0


SUPPORT = ProfileConfig(attributes={"helpfulness": 4, "verbosity": 1}, system_prompt="figs and nuts", max_tokens=5)


def test_profiles_preset_attributes_system_prompt_and_caps_and_requests_override_them(app) -> None:
    tuned = ProfileConfig(adapter="runs/team_lora")
    server = app(profiles={"support": SUPPORT, "plain": ProfileConfig(attributes={"coherence": None}), "tuned": tuned})
    status, body, _ = server.post(_ask(model="tiny:support"))
    assert status == 200 and body["model"] == "tiny:support"
    assert body["attributes"] == {"helpfulness": 4, "coherence": 3, "verbosity": 1}  # over the server's defaults
    status, body, _ = server.post(_ask(profile="support", attributes={"verbosity": 3, "helpfulness": None}))
    assert body["attributes"] == {"coherence": 3, "verbosity": 3}  # a request's values override the profile's
    assert server.post(_ask(model="tiny:plain"))[1]["attributes"] == {}
    assert server.post(_ask())[1]["attributes"] == {"coherence": 3}
    status, body, _ = server.post(_ask(profile="support", attributes=" verbosity:3 , coherence:0"))
    assert body["attributes"] == {"helpfulness": 4, "coherence": 0, "verbosity": 3}  # an attribute string alike
    prompts = [server.steering.tokenizer.decode(job.prompts[0]) for job in server.jobs]  # type: ignore[attr-defined]
    assert "figs and nuts" in prompts[0] and "helpfulness:4,coherence:3,verbosity:1" in prompts[0]
    assert "figs and nuts" not in prompts[3] and "be brief" in prompts[3]
    assert prompts[4].endswith("<extra_id_2>helpfulness:4,coherence:0,verbosity:3\n")
    refused = [
        (_ask(model="tiny:support", max_tokens=6), 400, "max_tokens_too_large", "profiles.support.max_tokens"),
        (_ask(model="tiny:nobody"), 404, "profile_not_found", "support"),
        (_ask(model="tiny:support", profile="plain"), 400, "conflicting_profile", "plain"),
        (_ask(model="other:support"), 404, "model_not_found", "tiny:support"),
    ]
    for body, status, code, phrase in refused:
        got, reply, _ = server.post(body)
        assert (got, reply["error"]["code"]) == (status, code) and phrase in reply["error"]["message"], reply
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("GET", "/v1/models")
    cards = json.loads(connection.getresponse().read())["data"]
    assert [card["id"] for card in cards] == ["tiny", "tiny:support", "tiny:plain", "tiny:tuned"]
    server.post(_ask(model="tiny:tuned"))
    assert [job.adapter for job in server.jobs] == [0] * (len(server.jobs) - 1) + [1]  # type: ignore[attr-defined]
    assert cards[1]["attributes"]["defaults"] == {"helpfulness": 4, "coherence": 3, "verbosity": 1}
    assert cards[1]["profile"] == {"name": "support", "system_prompt": "figs and nuts", "max_tokens": 5, "max_n": 8}


def test_the_model_card_and_each_answer_name_values_no_trained_attribute_line_carried(app) -> None:
    server = app()

    def card() -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", "/v1/models/tiny")
        return json.loads(connection.getresponse().read())["attributes"]

    status, body, _ = server.post(_ask())
    assert status == 200 and "untrained_attributes" not in body and card()["trained_values"] is None
    server.steering.trained = AttributeLines(4, {"coherence": {"4": 4}, "verbosity": {"1": 3, "2": 1}})
    assert card()["trained_values"] == {"coherence": {"4": 4}, "verbosity": {"1": 3, "2": 1}}
    status, body, _ = server.post(_ask())
    assert status == 200 and body["untrained_attributes"] == ["coherence:3"]  # the server's default
    status, body, _ = server.post(_ask(attributes={"coherence": 4, "verbosity": 0}))
    assert body["attributes"] == {"coherence": 4, "verbosity": 0} and body["untrained_attributes"] == ["verbosity:0"]
    assert "untrained_attributes" not in server.post(_ask(attributes={"coherence": 4}))[1]


def test_api_keys_are_required_and_a_key_bound_to_a_profile_serves_it(app, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the support team\nsk-support-0123456789 support\n\nsk-admin-0123456789abcdef\n")
    server = app(profiles={"support": SUPPORT}, api_keys=read_api_keys(str(keys), ["support"]))
    for headers in (
        {},
        {"Authorization": "Bearer sk-support-0123456788"},
        {"Authorization": "Basic sk-admin-0123456789abcdef"},
    ):
        status, body, answer = server.post(_ask(), headers)
        assert (status, body["error"]["code"], answer["WWW-Authenticate"]) == (401, "invalid_api_key", "Bearer")
    health = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    health.request("GET", "/health")
    assert health.getresponse().status == 200  # for load balancers: no key needed
    scrape = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    scrape.request("GET", "/metrics")
    assert scrape.getresponse().status == 401  # counts by profile: a key's holder only
    assert server.metrics({"Authorization": "Bearer sk-admin-0123456789abcdef"})
    admin = {"Authorization": "Bearer sk-admin-0123456789abcdef"}
    support = {"Authorization": "Bearer sk-support-0123456789"}
    assert server.post(_ask(), admin)[1]["attributes"] == {"coherence": 3}
    assert server.post(_ask(model="tiny:support"), admin)[0] == 200  # an unbound key may use any profile
    assert server.post(_ask(), support)[1]["attributes"] == {"helpfulness": 4, "coherence": 3, "verbosity": 1}
    status, body, _ = server.post(_ask(profile="other"), support)
    assert (status, body["error"]["code"]) == (403, "profile_not_allowed")
    for text, line, phrase in (("sk-short\n", 1, "shorter than 16"), ("# k\nsk-0123456789abcdef team\n", 2, "'team'")):
        keys.write_text(text)
        with pytest.raises(DataError, match=phrase) as error:
            read_api_keys(str(keys), ["support"])
        assert error.value.line == line


def test_metrics_count_what_the_answers_report_per_route_and_profile(app) -> None:
    """`GET /metrics`, read by prometheus_client's parser, after chat requests at the default profile and at a
    profile (n=2), a text completion and a request whose row fails: requests, rows and outcomes per route and
    profile, tokens equal to the answers' `usage`, one latency sample per request, the batch's steps."""
    server = app(profiles={"support": SUPPORT})
    answers = {
        "chat": [server.post(_ask(max_tokens=3))[1]],
        "support": [server.post(_ask(model="tiny:support", max_tokens=2, n=2))[1]],
        "completions": [_complete(server, {"prompt": "what does zog eat", "max_tokens": 2})[1]],
    }
    assert server.post(_ask(seed=666, temperature=1.0))[0] == 400  # the decoding refuses its row when it joins
    seen = server.metrics()
    labels = {"chat": ("", "chat"), "support": ("support", "chat"), "completions": ("", "completions")}
    rows = {"chat": 2, "support": 2, "completions": 1}  # chat's: the answered request's and the failed one's
    for name, (profile, route) in labels.items():
        key = _labels(profile=profile, route=route)
        usage = [answer["usage"] for answer in answers[name]]
        admitted = 2 if name == "chat" else 1
        assert seen[("steerlm_requests_admitted_total", key)] == admitted
        assert seen[("steerlm_rows_admitted_total", key)] == rows[name]
        assert seen[("steerlm_generation_tokens_total", key)] == sum(u["completion_tokens"] for u in usage)
        failed_prompt = seen[("steerlm_prompt_tokens_total", key)] - sum(u["prompt_tokens"] for u in usage) * (
            2 if name == "support" else 1  # each of the n rows decodes the prompt
        )
        assert failed_prompt == (usage[0]["prompt_tokens"] if name == "chat" else 0)  # the failed request's
        assert seen[("steerlm_requests_ended_total", _labels(*key, outcome="completed"))] == 1
        assert seen[("steerlm_rows_finished_total", _labels(*key, finish_reason="length"))] == (
            2 if name == "support" else 1
        )
        for histogram in ("request_latency_seconds", "time_to_first_token_seconds"):
            assert seen[(f"steerlm_{histogram}_count", key)] == 1
            assert seen[(f"steerlm_{histogram}_bucket", _labels(*key, le="+Inf"))] == 1
        assert seen[("steerlm_queue_wait_seconds_count", key)] == admitted
    assert seen[("steerlm_requests_ended_total", _labels(route="chat", profile="", outcome="failed"))] == 1
    assert seen[("steerlm_decode_steps_total", ())] == server.engine.steps > 0
    assert seen[("steerlm_requests_waiting", ())] == seen[("steerlm_rows_running", ())] == 0
    assert seen[("steerlm_healthy", ())] == 1


def test_nemo_generate_answers_in_nemos_shape_and_refuses_what_it_cannot_honour(app, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-support-0123456789 support\nsk-admin-0123456789abcdef\n")
    server = app(profiles={"support": SUPPORT}, api_keys=read_api_keys(str(keys), ["support"]))
    admin = {"Authorization": "Bearer sk-admin-0123456789abcdef"}
    tokenizer = server.steering.tokenizer

    def generate(body: dict, headers: dict = admin) -> tuple[int, dict]:
        status, reply, _ = server.post(body, headers, method="PUT", path="/generate")
        return status, reply

    sentences = ["what does zog eat", "figs and"]
    status, reply = generate({"sentences": sentences, "tokens_to_generate": 3, "top_k": 1, "greedy": True})
    assert status == 200, reply
    # the scripted decoding generates ids 1, 2, 3; NeMo's client reads sentences[i][len(prompt):]
    prompts = [tokenizer.encode(sentence) for sentence in sentences]
    assert reply["token_ids"] == [prompt + [1, 2, 3] for prompt in prompts]
    for sentence, prompt, text, tokens, offsets in zip(
        sentences, prompts, reply["sentences"], reply["tokens"], reply["offsets"]
    ):
        assert text == sentence + tokenizer.decode(prompt + [1, 2, 3])[len(tokenizer.decode(prompt)) :]
        assert tokens == [tokenizer.decode([i]) for i in prompt + [1, 2, 3]]
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    [job] = server.jobs  # one job, a row per sentence
    assert job.prompts == prompts and job.params == [job.params[0]] * 2 and job.params[0].temperature == 0
    assert reply["logprob"] is None  # not asked for, as NeMo answers
    status, scored = generate(
        {"sentences": sentences, "tokens_to_generate": 3, "greedy": True, "compute_logprob": True}
    )
    # every token after the first: the scripted prompt entries -(i + 1) / 8, then the answer's -1, -2, -3
    assert scored["logprob"] == [[-(i + 1) / 8 for i in range(len(p) - 1)] + [-1.0, -2.0, -3.0] for p in prompts]
    assert scored["token_ids"] == reply["token_ids"] and server.jobs[-1].params[0].prompt_logprobs
    sampled = {"sentences": ["figs"], "temperature": 0.5, "random_seed": 7}
    assert generate(sampled)[0] == 200
    assert (server.jobs[-1].params[0].temperature, server.jobs[-1].params[0].top_p) == (0.5, 0.9)  # NeMo's default
    assert server.jobs[-1].params[0].seed == 7 and server.jobs[-1].params[0].stop == ("<|endoftext|>",)
    refused = [
        ({"sentences": ["figs"], "all_probs": True}, 400, "all_probs", "unsupported_parameter", admin),
        ({"sentences": ["figs"], "repetition_penalty": 1.2}, 400, "repetition_penalty", "unsupported_parameter", admin),
        ({"sentences": ["figs"] * 9}, 400, "sentences", "too_many_sentences", admin),  # limits.max_n is 8
        ({"sentences": ["figs"], "tokens_to_generate": 65}, 400, "tokens_to_generate", "max_tokens_too_large", admin),
        ({"sentences": ["figs"], "tokens_to_generat": 5}, 422, "tokens_to_generat", "invalid_value", admin),
        ({"sentences": ["figs"], "end_strings": ["x", ""]}, 400, "end_strings", "invalid_stop", admin),
        (
            {"sentences": ["figs"], "end_strings": ["a", "b", "c", "d", "e"]},
            400,
            "end_strings",
            "too_many_stop_strings",
            admin,
        ),
        ({"sentences": ["figs"], "end_strings": ["x" * 41]}, 400, "end_strings", "stop_too_long", admin),
        ({"sentences": ["figs"]}, 403, None, "profile_not_allowed", {"Authorization": "Bearer sk-support-0123456789"}),
    ]
    for body, status, param, code, headers in refused:
        got, reply = generate(body, headers)
        assert (got, reply["error"]["param"], reply["error"]["code"]) == (status, param, code), reply


def _complete(server: AppServer, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, reply, _ = server.post({"model": "tiny", **body}, headers, path="/v1/completions")
    return status, reply


def _after(tokenizer, before: list[int], token: int) -> str:
    """A token's text after `before`, by decoding the whole prefix (the route decodes a short window)."""
    return tokenizer.decode([*before, token])[len(tokenizer.decode(before)) :]


def test_completions_score_a_prompt_as_lm_eval_harness_reads_it_plain_and_streamed(app) -> None:
    """lm-evaluation-harness's loglikelihood request (context + continuation ids, echo, logprobs 1, max_tokens 1,
    temperature 0): an entry per token in order, the prompt's first null, the values the decoding made (the
    scripted decoding scores prompt token i + 1 at -(i + 1) / 8, the answer's token 1 at -1, alternative id 1
    at -1); each token's text where its offset says; the same entries streamed."""
    server = app()
    tokenizer = server.steering.tokenizer
    ids = tokenizer.encode("what does zog eat figs")
    request = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}
    status, reply = _complete(server, request)
    assert status == 200, reply
    [choice] = reply["choices"]
    assert (reply["object"], choice["index"], choice["finish_reason"]) == ("text_completion", 0, "length")
    assert choice["text"] == tokenizer.decode(ids) + "w1 "
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"] == [None] + [-(i + 1) / 8 for i in range(len(ids) - 1)] + [-1.0]
    pieces = [_after(tokenizer, ids[:i], t) for i, t in enumerate(ids)]
    assert logprobs["tokens"] == pieces + [_after(tokenizer, ids, 1)]
    assert logprobs["top_logprobs"][0] is None
    for i in range(1, len(ids)):  # the alternative (id 1) and the token itself
        assert logprobs["top_logprobs"][i] == {_after(tokenizer, ids[:i], 1): -1.0, pieces[i]: -i / 8}
    assert logprobs["top_logprobs"][-1] == {_after(tokenizer, ids, 1): -1.0}  # the token is the alternative
    text = choice["text"]
    for token, offset in zip(logprobs["tokens"][: len(ids)], logprobs["text_offset"]):
        assert text[offset : offset + len(token)] == token
    assert logprobs["text_offset"][-1] == len(tokenizer.decode(ids))
    # lm-evaluation-harness's parse_logprobs, for a continuation of the last 2 tokens
    context_length = len(ids) - 2
    continuation = logprobs["token_logprobs"][context_length:-1]
    greedy = all(v == max(top.values()) for v, top in zip(continuation, logprobs["top_logprobs"][context_length:-1]))
    assert sum(continuation) == pytest.approx(-(len(ids) - 2 + len(ids) - 1) / 8) and greedy
    [job] = server.jobs
    assert job.prompts == [ids] and job.params[0].prompt_logprobs and job.params[0].text_after_prompt
    streamed_request = {"model": "tiny", **request, "stream": True, "stream_options": {"include_usage": True}}
    payloads = list(_events(server.open(streamed_request, "/v1/completions").getresponse()))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["usage"] == reply["usage"] and chunks[-1]["choices"] == []
    parts = [c for chunk in chunks[:-1] for c in chunk["choices"]]
    assert "".join(c["text"] for c in parts) == text and parts[-1]["finish_reason"] == "length"
    streamed = {key: [v for c in parts for v in c["logprobs"][key]] for key in logprobs}
    assert streamed == logprobs


def test_completions_continue_each_prompt_n_times_and_echo_string_prompts_as_sent(app) -> None:
    server = app()
    tokenizer = server.steering.tokenizer
    prompts = ["what does zog eat", "figs and"]
    status, reply = _complete(server, {"prompt": prompts, "n": 2, "max_tokens": 2, "temperature": 0.5, "seed": 3})
    assert status == 200, reply
    assert [(c["index"], c["text"], c["logprobs"]) for c in reply["choices"]] == [(i, "w1 w2 ", None) for i in range(4)]
    bos = tokenizer.bos_id
    assert reply["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) + 1 for p in prompts)
    [job] = server.jobs  # choice i * n + j: prompt i's j-th, sampled with seed + j
    assert job.prompts == [[bos, *tokenizer.encode(p)] for p in prompts for _ in range(2)]
    assert [(p.seed, p.temperature, p.max_new_tokens) for p in job.params] == [(3, 0.5, 2), (4, 0.5, 2)] * 2
    assert all(p.text_after_prompt and not p.logprobs and not p.prompt_logprobs for p in job.params)
    status, reply = _complete(server, {"prompt": "figs and", "echo": True, "logprobs": 0, "max_tokens": 1})
    logprobs = reply["choices"][0]["logprobs"]
    assert reply["choices"][0]["text"] == "figs and" + "w1 "  # the prompt as sent, without the BOS put before it
    assert logprobs["tokens"][0] == "" and logprobs["token_logprobs"][0] is None  # the server's BOS
    assert "".join(logprobs["tokens"][:-1]) == tokenizer.decode(tokenizer.encode("figs and"))
    # logprobs 0: no alternatives, the token itself only
    assert [list(top) for top in logprobs["top_logprobs"][1:]] == [[t] for t in logprobs["tokens"][1:]]
    assert server.jobs[-1].params[0].max_new_tokens == 1
    status, reply = _complete(server, {"prompt": "figs"})
    assert server.jobs[-1].params[0].max_new_tokens == 16  # OpenAI's default for this route


def test_completions_with_max_tokens_0_score_the_prompt_alone(app) -> None:
    """The legacy API's scoring request (echo, logprobs, max_tokens 0): the prompt's text and entries, nothing
    generated; streamed alike."""
    server = app()
    tokenizer = server.steering.tokenizer
    ids = tokenizer.encode("what does zog eat figs")
    request = {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    status, reply = _complete(server, request)
    assert status == 200, reply
    [choice] = reply["choices"]
    assert (choice["text"], choice["finish_reason"]) == (tokenizer.decode(ids), "length")
    assert choice["logprobs"]["token_logprobs"] == [None] + [-(i + 1) / 8 for i in range(len(ids) - 1)]
    assert choice["logprobs"]["tokens"] == [_after(tokenizer, ids[:i], t) for i, t in enumerate(ids)]
    assert reply["usage"]["completion_tokens"] == 0 and server.jobs[-1].params[0].max_new_tokens == 0
    payloads = list(_events(server.open({"model": "tiny", **request, "stream": True}, "/v1/completions").getresponse()))
    [chunk] = [json.loads(p)["choices"][0] for p in payloads[:-1]]
    assert (chunk["text"], chunk["logprobs"], chunk["finish_reason"]) == (choice["text"], choice["logprobs"], "length")


def test_completions_refuse_what_they_cannot_honour_by_name(app, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-support-0123456789 support\nsk-admin-0123456789abcdef\n")
    server = app(profiles={"support": SUPPORT}, api_keys=read_api_keys(str(keys), ["support"]))
    admin = {"Authorization": "Bearer sk-admin-0123456789abcdef"}
    vocabulary = server.steering.tokenizer.vocab_size
    refused = [
        ({"prompt": "figs", "suffix": "nuts"}, 400, "suffix", "unsupported_parameter"),
        ({"prompt": "figs", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
        ({"prompt": "figs", "logit_bias": {"5": 100}}, 400, "logit_bias", "unsupported_parameter"),
        ({"prompt": "figs", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
        ({"prompt": "figs", "max_tokens": -1}, 422, "max_tokens", "invalid_value"),
        ({"prompt": "figs", "max_tokens": 65}, 400, "max_tokens", "max_tokens_too_large"),
        ({"prompt": "figs", "logprobs": 21}, 400, "logprobs", "invalid_logprobs"),
        ({"prompt": ["figs"] * 3, "n": 3}, 400, "prompt", "too_many_choices"),  # 9 > limits.max_n 8
        ({"prompt": "figs", "n": 9}, 400, "n", "too_many_choices"),
        ({"prompt": [5, vocabulary]}, 400, "prompt", "invalid_token_id"),
        ({"prompt": [[5], [-1]]}, 400, "prompt[1]", "invalid_token_id"),
        ({"prompt": [[5], []]}, 400, "prompt[1]", "context_length_exceeded"),
        ({"prompt": []}, 400, "prompt", "empty_prompt"),
        ({"prompt": "figs " * 1000}, 400, "prompt", "context_length_exceeded"),
        ({"prompt": "figs", "stop": ["x", ""]}, 400, "stop", "invalid_stop"),
        ({"prompt": "figs", "temperature": 1e-310}, 400, "temperature", "invalid_temperature"),
        ({"prompt": {"text": "figs"}}, 422, "prompt", "invalid_value"),
        ({"prompt": "figs", "model": "tiny:support"}, 404, "model", "model_not_found"),
    ]
    for body, status, param, code in refused:
        got, reply = _complete(server, body, admin)
        assert (got, reply["error"]["param"], reply["error"]["code"]) == (status, param, code), (body, reply)
    assert server.jobs == []
    got, reply = _complete(server, {"prompt": "figs"}, {"Authorization": "Bearer sk-support-0123456789"})
    assert (got, reply["error"]["code"]) == (403, "profile_not_allowed")
    assert _complete(server, {"prompt": "figs", "best_of": 1, "user": "u-1"}, admin)[0] == 200


def test_completions_run_a_profiles_adapter_and_refuse_a_profile_without_one(app) -> None:
    """Raw text names a profile only for its LoRA adapter: `tiny:tuned`'s rows carry its adapter and profile; a
    profile without adapters (its attributes would not apply) and another model are refused, naming what is
    served."""
    server = app(profiles={"support": SUPPORT, "tuned": ProfileConfig(adapter="runs/team_lora")})
    status, reply = _complete(server, {"prompt": "figs", "model": "tiny:tuned", "max_tokens": 2})
    assert status == 200 and reply["model"] == "tiny:tuned"
    assert _complete(server, {"prompt": "figs", "model": "tiny", "max_tokens": 2})[0] == 200
    jobs = [(job.route, job.profile, job.adapter) for job in server.jobs]  # type: ignore[attr-defined]
    assert jobs == [("completions", "tuned", 1), ("completions", "", 0)]
    for model, phrase in (("tiny:support", "profile 'support' has no LoRA adapter"), ("other:tuned", "'other:tuned'")):
        status, reply = _complete(server, {"prompt": "figs", "model": model})
        assert (status, reply["error"]["code"], reply["error"]["param"]) == (404, "model_not_found", "model")
        assert phrase in reply["error"]["message"] and "it serves tiny, tiny:tuned" in reply["error"]["message"]
    assert len(server.jobs) == 2  # type: ignore[attr-defined]
    status, reply, _ = server.post({"model": "tiny:tuned", "prompt": "figs"}, path="/tokenize")
    assert status == 200 and reply["tokens"][1:] == server.steering.tokenizer.encode("figs")


def test_tokenizer_routes_give_the_ids_the_completion_and_chat_routes_use(app, tmp_path) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info, as lm-evaluation-harness's remote tokenizer reads them:
    a prompt's ids are those /v1/completions decodes from, a chat's those /v1/chat/completions builds (a
    profile's attributes included), and the special tokens' text encodes back to their ids."""
    keys = tmp_path / "keys"
    keys.write_text("sk-support-0123456789 support\nsk-admin-0123456789abcdef\n")
    server = app(profiles={"support": SUPPORT}, api_keys=read_api_keys(str(keys), ["support"]))
    admin = {"Authorization": "Bearer sk-admin-0123456789abcdef"}
    tokenizer = server.steering.tokenizer

    def call(path: str, body: dict | None = None, headers: dict = admin) -> tuple[int, dict]:
        status, reply, _ = server.post(body or {}, headers, method="GET" if body is None else "POST", path=path)
        return status, reply

    status, info = call("/tokenizer_info")
    assert status == 200 and info["model_max_length"] == server.steering.max_prompt_tokens + 1
    for role in ("bos", "eos", "pad"):  # lm-eval's RemoteTokenizer takes encode(<text>)[0] as the id
        token = info[f"{role}_token"]
        _, reply = call("/tokenize", {"prompt": token, "add_special_tokens": False})
        assert reply["tokens"] == [getattr(tokenizer, f"{role}_id")], role
    glued = {"prompt": f"figs{info['eos_token']}and{info['bos_token']}", "add_special_tokens": False}
    expected = [*tokenizer.encode("figs"), tokenizer.eos_id, *tokenizer.encode("and"), tokenizer.bos_id]
    assert call("/tokenize", glued)[1]["tokens"] == expected  # inside text too, as HF tokenizers encode them
    text = "what does zog eat"
    status, reply = call("/tokenize", {"model": "tiny", "prompt": text})
    assert status == 200 and reply["tokens"] == [tokenizer.bos_id, *tokenizer.encode(text)]
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == info["model_max_length"]
    _complete(server, {"prompt": text, "max_tokens": 1}, admin)
    assert server.jobs[-1].prompts[0] == reply["tokens"]
    assert call("/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"] == tokenizer.encode(text)
    status, reply = call("/detokenize", {"tokens": tokenizer.encode(text)})
    assert (status, reply) == (200, {"prompt": tokenizer.decode(tokenizer.encode(text))})
    for model, attributes in (("tiny", {"complexity": 3}), ("tiny", "complexity:3"), ("tiny:support", None)):
        chat = {"model": model, "messages": MESSAGES, "attributes": attributes}
        status, reply = call("/tokenize", chat)
        assert status == 200, reply
        server.post({**chat, "max_tokens": 1}, admin)
        assert reply["tokens"] == server.jobs[-1].prompts[0], model
    assert "verbosity:1" in tokenizer.decode(reply["tokens"])  # the support profile's attributes
    support = {"Authorization": "Bearer sk-support-0123456789"}
    refused = [
        ({"prompt": "figs", "messages": MESSAGES}, "/tokenize", admin, 400, "prompt"),
        ({"add_special_tokens": True}, "/tokenize", admin, 400, "prompt"),
        ({"prompt": "figs", "attributes": {"humor": 1}}, "/tokenize", admin, 400, "attributes"),
        ({"messages": MESSAGES}, "/tokenize", admin, 400, "model"),
        (
            {"model": "tiny", "messages": MESSAGES, "add_special_tokens": True},
            "/tokenize",
            admin,
            400,
            "add_special_tokens",
        ),
        ({"model": "tiny", "messages": MESSAGES, "attributes": {"wit": 2}}, "/tokenize", admin, 400, "attributes.wit"),
        ({"model": "tiny:support", "messages": MESSAGES}, "/tokenize", support, 200, None),
        ({"model": "tiny", "messages": MESSAGES, "profile": "other"}, "/tokenize", support, 403, "model"),
        ({"prompt": "figs", "model": "gpt-4"}, "/tokenize", admin, 404, "model"),
        ({"prompt": "figs", "special": True}, "/tokenize", admin, 422, "special"),
        ({"tokens": [tokenizer.vocab_size]}, "/detokenize", admin, 400, "tokens"),
    ]
    for body, path, headers, expected, param in refused:
        status, reply = call(path, body, headers)
        assert (status, None if status == 200 else reply["error"]["param"]) == (expected, param), (body, reply)
