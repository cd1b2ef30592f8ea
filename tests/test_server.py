"""Serving with a real uvicorn server: it answers the official `openai` client (plain and streaming) and raw HTTP
(the `attributes` field, every 4xx, and it keeps answering); co-batched requests get what they get alone; the scoring
endpoint equals the annotation recipe; TP=2 and PP=2 servers answer like TP=1 and shut down gracefully on SIGTERM.
Configs and requests without a server: tests/test_serve_config.py."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.inference.steering import ChatMessage
from tests.multiproc import _free_port
from tests.recipe_runner import ROOT, recipe_command, recipe_env, run_recipe, train_apm
from tests.test_serve_config import _steering

START_SECONDS = 180


# --- a real server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(steerable: dict, tmp_path_factory) -> dict:
    """The shared SFT run, an APM trained briefly on the same world, and the annotation recipe's scores of two
    conversations (the second multi-turn) to compare the scoring endpoint with."""
    root, data = tmp_path_factory.mktemp("serve"), steerable["data"]
    apm = train_apm(data, root / "apm", "trainer.max_steps=10")
    rows = [json.loads(line) for line in (data / "unlabelled.jsonl").read_text().splitlines()[:3]]
    rows[1]["conversations"] = rows[1]["conversations"][:2] + rows[2]["conversations"][:2]
    conversations = root / "conversations.jsonl"
    conversations.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    annotated = root / "annotated.jsonl"
    result = run_recipe(
        "annotate", [f"apm_checkpoint={apm}", f"input={conversations}", f"output={annotated}", "mode=overwrite"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        **steerable,
        "apm": apm,
        "rows": rows[:2],
        "annotated": [json.loads(line) for line in annotated.read_text().splitlines()],
    }


def _start(args: list[str], port: int, log: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    """A server process; returns once /health answers 200 (or fails with its log)."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            recipe_command("serve", [*args, f"server.port={port}"], launcher),
            cwd=ROOT,
            env=recipe_env(),
            stdout=stderr,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _request(port, "GET", "/health")[0] == 200:
                return process
        except OSError:
            time.sleep(0.25)
    process.kill()
    pytest.fail(f"the server did not answer within {START_SECONDS} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM, as a scheduler would send it: the server must finish and exit 0."""
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def _request(
    port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def server(world: dict, tmp_path_factory):
    port, log = _free_port(), tmp_path_factory.mktemp("server") / "server.log"
    process = _start(
        [
            f"checkpoint={world['sft']}",
            f"apm_checkpoint={world['apm']}",
            "limits.max_request_bytes=20000",
            "limits.max_tokens=64",
            "sampling.max_tokens=32",
            "limits.max_n=4",
            "attributes.helpfulness=3",
        ],
        port,
        log,
    )
    yield {"port": port, "url": f"http://127.0.0.1:{port}/v1", "log": log}
    _stop(process, log)


QUESTION = [{"role": "user", "content": "What color is Tanlinyal?"}]
# the server's defaults: steerlm_oasst's best response with the configured helpfulness=3 laid over it
DEFAULTS = dict(quality=4, toxicity=0, humor=0, creativity=0, helpfulness=3, correctness=4, coherence=4, complexity=2,
                verbosity=2)  # fmt: skip


@pytest.mark.slow
def test_openai_client_plain_and_streaming_agree(server: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0)
    [card] = client.models.list().data
    assert card.id == "sft" and card.model_extra["attributes"]["defaults"] == DEFAULTS
    steer = {"attributes": {"verbosity": 3}}
    plain = client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=40, extra_body=steer)
    answer = plain.choices[0]
    assert answer.message.role == "assistant" and answer.message.content.strip()
    assert answer.finish_reason in ("stop", "length") and plain.id.startswith("chatcmpl-") and plain.model == "sft"
    assert plain.usage.prompt_tokens > 10 and 0 < plain.usage.completion_tokens <= 40
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="sft",
            messages=QUESTION,
            max_tokens=40,
            extra_body=steer,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and len({c.id for c in chunks}) == 1
    # log-probabilities through the official client, the same plain and streamed; greedy: each token is its top one
    scored = client.chat.completions.create(
        model="sft", messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob for t in content)
    streamed = client.chat.completions.create(
        model="sft", messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in tokens] == [t.model_dump() for t in content]
    sampled = client.chat.completions.create(
        model="sft", messages=QUESTION, max_tokens=20, n=3, temperature=1.0, seed=5
    )
    assert [choice.index for choice in sampled.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in sampled.choices}) > 1  # row i samples with seed + i


@pytest.mark.slow
def test_attributes_field_steers_and_is_echoed(server: dict) -> None:
    def ask(attributes: dict) -> dict:
        status, body = _request(
            server["port"],
            "POST",
            "/v1/chat/completions",
            {"model": "sft", "messages": QUESTION, "max_tokens": 60, "attributes": attributes},
        )
        assert status == 200, body
        return body

    terse, wordy = ask({"verbosity": 0}), ask({"verbosity": 4, "helpfulness": None})
    assert terse["attributes"] == {**DEFAULTS, "verbosity": 0}
    assert wordy["attributes"] == {**{k: v for k, v in DEFAULTS.items() if k != "helpfulness"}, "verbosity": 4}
    texts = [reply["choices"][0]["message"]["content"] for reply in (terse, wordy)]
    assert texts[0] != texts[1]


def _metrics(port: int) -> dict[tuple, float]:
    """GET /metrics read by prometheus_client's parser: (sample name, sorted label pairs) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    families = text_string_to_metric_families(response.read().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


@pytest.mark.slow
def test_metrics_count_the_models_tokens_as_the_answers_usage_does(server: dict) -> None:
    """The real decoding's deltas (stop tokens, stop strings) counted in /metrics as the answers count them."""
    port = server["port"]
    before = _metrics(port)
    status, body = _request(
        port,
        "POST",
        "/v1/chat/completions",
        {"model": "sft", "messages": QUESTION, "max_tokens": 30, "n": 3, "temperature": 1.0, "seed": 11},
    )
    assert status == 200, body
    answer = [*QUESTION, {"role": "assistant", "content": body["choices"][0]["message"]["content"]}]
    assert _request(port, "POST", "/v1/attributes/score", {"messages": answer})[0] == 200
    after = _metrics(port)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    chat, usage = {"route": "chat", "profile": ""}, body["usage"]
    assert grew("steerlm_generation_tokens_total", **chat) == usage["completion_tokens"] > 0
    assert grew("steerlm_prompt_tokens_total", **chat) == 3 * usage["prompt_tokens"]  # each row decodes it
    assert grew("steerlm_rows_admitted_total", **chat) == 3
    reasons = [choice["finish_reason"] for choice in body["choices"]]
    for reason in ("stop", "length"):
        assert grew("steerlm_rows_finished_total", **chat, finish_reason=reason) == reasons.count(reason)
    for route in ("chat", "score"):
        assert grew("steerlm_requests_ended_total", route=route, profile="", outcome="completed") == 1
        assert grew("steerlm_request_latency_seconds_count", route=route, profile="") == 1
    assert grew("steerlm_decode_steps_total") >= max(1, usage["completion_tokens"] // 3)


def _tutorial_prompt() -> str:
    """The SteerLM tutorial's hand-built prompt for QUESTION at the server's default attributes."""
    values = ",".join(f"{key}:{value}" for key, value in DEFAULTS.items())
    return (
        f"<extra_id_0>System\n{DEFAULT_SYSTEM_PROMPT}\n<extra_id_1>User\n{QUESTION[0]['content']}\n"
        f"<extra_id_1>Assistant\n<extra_id_2>{values}\n"
    )


@pytest.mark.slow
def test_nemos_tutorial_client_gets_what_the_chat_endpoint_answers(server: dict) -> None:
    """The SteerLM tutorial's `get_answer` (NeMo-Aligner docs), its prompt built by hand, against PUT /generate:
    the same greedy answer as /v1/chat/completions, with the end string NeMo leaves on it; with compute_logprob,
    every token's log-probability."""
    prompt = _tutorial_prompt()
    data = {
        "sentences": [prompt],
        "tokens_to_generate": 40,
        "top_k": 1,
        "greedy": True,
        "end_strings": ["<extra_id_1>"],
        "add_BOS": True,  # as the chat template's ids start
    }
    status, nemo = _request(server["port"], "PUT", "/generate", data)
    assert status == 200, nemo
    status, chat = _request(
        server["port"], "POST", "/v1/chat/completions", {"model": "sft", "messages": QUESTION, "max_tokens": 40}
    )
    choice = chat["choices"][0]
    answer = nemo["sentences"][0][len(prompt) :]
    assert answer == choice["message"]["content"] + ("\n<extra_id_1>" if choice["finish_reason"] == "stop" else "")
    assert len(nemo["token_ids"][0]) == len(nemo["tokens"][0]) == len(nemo["offsets"][0])
    assert len(nemo["token_ids"][0]) == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] + (
        choice["finish_reason"] == "stop"
    )
    # compute_logprob: each token after the first (the kept end-of-turn token included) as the same sequence
    # scored in one prefill pass by /v1/completions with echo
    status, scored = _request(server["port"], "PUT", "/generate", {**data, "compute_logprob": True})
    assert status == 200 and scored["token_ids"] == nemo["token_ids"] and nemo["logprob"] is None
    ids = nemo["token_ids"][0]
    echoed = {"model": "sft", "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    reference = _request(server["port"], "POST", "/v1/completions", echoed)[1]["choices"][0]["logprobs"]
    assert scored["logprob"][0] == pytest.approx(reference["token_logprobs"][1:], abs=1e-4)


@pytest.mark.slow
def test_completions_score_the_chat_answer_as_the_chat_route_scored_it(server: dict) -> None:
    """lm-evaluation-harness's loglikelihood request through the official client: the token ids of the
    tutorial prompt and the greedy answer (from PUT /generate) with echo, logprobs 1 and max_tokens 1. The
    answer's tokens, scored in one prefill pass, get the log-probabilities the chat route gave them as it
    decoded them one at a time, and each is its position's most likely token (lm-eval's `is_greedy`); a string
    prompt continued greedily gives the chat route's answer."""
    import openai

    prompt = _tutorial_prompt()
    generate = {
        "sentences": [prompt],
        "tokens_to_generate": 12,
        "greedy": True,
        "add_BOS": True,
        "end_strings": ["<x>"],
    }
    status, nemo = _request(server["port"], "PUT", "/generate", generate)
    assert status == 200, nemo
    ids = nemo["token_ids"][0]
    status, chat = _request(
        server["port"],
        "POST",
        "/v1/chat/completions",
        {"model": "sft", "messages": QUESTION, "max_tokens": 12, "temperature": 0, "logprobs": True},
    )
    decoded = [entry["logprob"] for entry in chat["choices"][0]["logprobs"]["content"]]
    context_length = chat["usage"]["prompt_tokens"]
    assert len(ids) == context_length + len(decoded)  # the same prompt, the same answer
    status, tokenized = _request(server["port"], "POST", "/tokenize", {"model": "sft", "messages": QUESTION})
    assert status == 200 and tokenized["tokens"] == ids[:context_length]  # the chat route's prompt ids
    client = openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0)
    scored = client.completions.create(model="sft", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 1
    answer = logprobs.token_logprobs[context_length:-1]
    assert answer == pytest.approx(decoded, abs=1e-4)
    assert all(value == max(top.values()) for value, top in zip(answer, logprobs.top_logprobs[context_length:-1]))
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    alone = client.completions.create(model="sft", prompt=ids, echo=True, logprobs=1, max_tokens=0)  # legacy scoring
    assert alone.usage.completion_tokens == 0 and alone.choices[0].finish_reason == "length"
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:-1], abs=1e-6)
    text = scored.choices[0].text
    assert all(text[o : o + len(t)] == t for o, t in zip(logprobs.text_offset, logprobs.tokens))
    continued = client.completions.create(
        model="sft", prompt=prompt, max_tokens=40, temperature=0, stop=["<extra_id_1>"]
    )
    status, chat = _request(
        server["port"], "POST", "/v1/chat/completions", {"model": "sft", "messages": QUESTION, "max_tokens": 40}
    )
    ending = "\n" if chat["choices"][0]["finish_reason"] == "stop" else ""  # the turn's newline before the marker
    assert continued.choices[0].text == chat["choices"][0]["message"]["content"] + ending


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server: dict) -> None:
    port = server["port"]
    good = {"model": "sft", "messages": QUESTION, "max_tokens": 5}
    cases = [
        (b'{"model": "sft", "messages": [', 400, None, "invalid_json"),
        ({**good, "attributes": {"wit": 2}}, 400, "attributes.wit", "unknown_attribute"),
        ({**good, "attributes": {"verbosity": 7}}, 400, "attributes.verbosity", "attribute_out_of_range"),
        ({**good, "attributes": {"verbosity": "high"}}, 400, "attributes.verbosity", "invalid_attribute_value"),
        ({**good, "max_tokens": 65}, 400, "max_tokens", "max_tokens_too_large"),
        ({**good, "n": 5}, 400, "n", "n_too_large"),
        ({**good, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
        ({**good, "top_logprobs": 3}, 400, "top_logprobs", "invalid_top_logprobs"),
        (
            {**good, "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "messages[0].role",
            "invalid_message_order",
        ),
        (
            {**good, "messages": [{"role": "user", "content": "coat " * 600}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({**good, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({**good, "temperature": "hot"}, 422, "temperature", "invalid_value"),
        ({**good, "messages": [{"role": "user"}]}, 422, "messages[0].content", "invalid_value"),
        ({**good, "messages": [{"role": "user", "content": "x" * 30000}]}, 413, None, "request_too_large"),
    ]
    for body, status, param, code in cases:
        got, reply = _request(port, "POST", "/v1/chat/completions", body)
        error = reply.get("error") or {}
        assert (got, error.get("param"), error.get("code")) == (status, param, code), (body, reply)
        assert error["message"] and error["type"]
    chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # no Content-Length: counted as it arrives
    chunked.request(
        "POST",
        "/v1/chat/completions",
        iter([b"x" * 15000, b"x" * 15000]),
        {"Content-Type": "application/json"},
        encode_chunked=True,
    )
    assert chunked.getresponse().status == 413
    assert _request(port, "GET", "/v2/nothing")[0] == 404
    status, health = _request(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["queued"] == 0
    status, reply = _request(port, "POST", "/v1/chat/completions", good)
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_concurrent_requests_all_get_their_own_answer(server: dict) -> None:
    port, results = server["port"], {}

    def ask(verbosity: int) -> None:
        results[verbosity] = _request(
            port,
            "POST",
            "/v1/chat/completions",
            {"model": "sft", "messages": QUESTION, "max_tokens": 30, "attributes": {"verbosity": verbosity}},
        )

    before = _request(port, "GET", "/health")[1]
    threads = [threading.Thread(target=ask, args=(v,)) for v in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = _request(port, "GET", "/health")[1]
    assert after["rows"] - before["rows"] == 5 and after["requests"] - before["requests"] == 5
    for verbosity in range(5):
        status, reply = results[verbosity]
        alone = _request(
            port,
            "POST",
            "/v1/chat/completions",
            {"model": "sft", "messages": QUESTION, "max_tokens": 30, "attributes": {"verbosity": verbosity}},
        )[1]
        assert status == 200 and reply["choices"] == alone["choices"]  # batching changes no answer


def _at_once(port: int, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body at the same moment (one thread each); the answers in order."""
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def ask(index: int) -> None:
        start.wait()
        results[index] = _request(port, "POST", "/v1/chat/completions", bodies[index])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.slow
def test_a_bad_request_sent_with_good_ones_fails_alone(server: dict) -> None:
    port = server["port"]
    good = {"model": "sft", "messages": QUESTION, "max_tokens": 30, "temperature": 0.8, "seed": 3}
    bad = [
        {**good, "seed": 2**63},  # once raised inside the decoding loop and failed every co-batched request
        {**good, "top_k": 2**63},
        {**good, "stop": [f"x{i}" for i in range(500)]},
    ]
    answers = _at_once(port, [good, *bad, good])
    assert [status for status, _ in answers] == [200, 400, 400, 400, 200]
    assert [reply["error"]["code"] for _, reply in answers[1:4]] == [
        "invalid_seed",
        "invalid_top_k",
        "too_many_stop_strings",
    ]
    alone = _request(port, "POST", "/v1/chat/completions", good)[1]
    assert answers[0][1]["choices"] == answers[4][1]["choices"] == alone["choices"]


@pytest.mark.slow
def test_seeded_sampled_requests_get_their_solo_text_under_load(server: dict) -> None:
    """Six sampled requests of different lengths sent at once (rows joining and leaving one batch) equal the
    same requests sent one by one."""
    port = server["port"]
    bodies = [
        {"model": "sft", "messages": QUESTION, "max_tokens": 8 + 5 * i, "temperature": 1.0, "top_p": 0.95, "seed": i}
        for i in range(6)
    ]
    bodies[2]["messages"] = [{"role": "user", "content": "Tell me about the Tanlinyal and its coat."}]
    before = _request(port, "GET", "/health")[1]
    loaded = _at_once(port, bodies)
    after = _request(port, "GET", "/health")[1]
    assert after["requests"] - before["requests"] == 6
    for body, (status, reply) in zip(bodies, loaded):
        alone = _request(port, "POST", "/v1/chat/completions", body)[1]
        assert status == 200 and reply["choices"] == alone["choices"]


@pytest.mark.slow
def test_scoring_endpoint_equals_the_annotation_recipe(world: dict, server: dict) -> None:
    from steerlm.data.apm import attribute_examples
    from steerlm.data.lengths import LengthPolicy, LengthStats
    from steerlm.data.records import from_conversation_json
    from steerlm.data.template import SteerLMTemplate
    from steerlm.inference.scoring import AttributeScorer, open_apm_checkpoint
    from steerlm.tokenizers import load_tokenizer

    apm = open_apm_checkpoint(world["apm"])
    tokenizer = load_tokenizer(apm.config.tokenizer.type.value, apm.config.tokenizer.path)
    scorer = AttributeScorer([], None, apm.schema, tokenizer, seq_length=512)  # tokenisation only, no model
    for row, annotated in zip(world["rows"], world["annotated"]):
        messages = [{"role": "system", "content": row["system"]}] + [
            {"role": turn["from"].lower(), "content": turn["value"]} for turn in row["conversations"]
        ]
        conversation = _steering().scoring_conversation([ChatMessage(m["role"], m["content"]) for m in messages])
        stored = from_conversation_json(row, apm.schema, "row", 1)
        assert (conversation.system, conversation.turns) == (stored.system, stored.turns)
        labelled = from_conversation_json(annotated, apm.schema, "row", 1)  # the APM-training form of the row
        training = attribute_examples(
            [labelled], apm.schema, SteerLMTemplate(apm.schema), tokenizer, 512, LengthPolicy.truncate, LengthStats()
        )[-1]
        assert scorer.examples([conversation])[0].ids == training.ids

        status, reply = _request(server["port"], "POST", "/v1/attributes/score", {"messages": messages})
        assert status == 200, reply
        expected = annotated["attribute_scores"][-1]
        assert reply["scores"] == pytest.approx(expected, abs=1e-4)
        assert reply["labels"] == apm.schema.clip_round(reply["scores"]) and reply["reward"] is None
    status, reply = _request(server["port"], "POST", "/v1/attributes/score", {"messages": QUESTION})
    assert status == 400 and reply["error"]["param"] == "messages"  # nothing to rate: the last message is the user's


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["tp2", "pp2"])
def test_two_rank_server_answers_like_one_and_stops_gracefully(
    world: dict, server: dict, tmp_path: Path, parallel: str
) -> None:
    """TP=2 (each rank half the heads) and PP=2 (each rank one of the two layers, the stages in turn)."""
    import psutil

    request = {"model": "sft", "messages": QUESTION, "max_tokens": 40, "attributes": {"verbosity": 2}}
    expected = _request(server["port"], "POST", "/v1/chat/completions", request)[1]["choices"]
    # the two servers' default helpfulness differ (3 and 4): named, so both score the same prompt
    scored = {**request, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "attributes": {"helpfulness": 4}}
    raw = "<extra_id_0>System\n\n<extra_id_1>User\nWhat color is Tanlinyal?\n<extra_id_1>Assistant\n"
    nemo = {"sentences": [raw], "tokens_to_generate": 8, "greedy": True}

    echoed = {"model": "sft", "prompt": raw, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}

    def answers(port: int) -> tuple[list, list, dict]:
        choice = _request(port, "POST", "/v1/chat/completions", scored)[1]["choices"][0]
        entries = choice["logprobs"]["content"]
        tokens = [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in entries]
        values = [v for e in entries for v in (e["logprob"], *(t["logprob"] for t in e["top_logprobs"]))]
        # the prompt's log-probabilities too: every rank scores the prompt in the same spans
        completion = _request(port, "POST", "/v1/completions", echoed)[1]["choices"][0]
        tops = completion["logprobs"]["top_logprobs"][1:]
        tokens += [completion["text"], completion["logprobs"]["tokens"], [sorted(top) for top in tops]]
        values += completion["logprobs"]["token_logprobs"][1:] + [v for top in tops for _, v in sorted(top.items())]
        return tokens, values, _request(port, "PUT", "/generate", nemo)[1]

    tp1_tokens, tp1_values, tp1_nemo = answers(server["port"])
    port, log = _free_port(), tmp_path / f"{parallel}.log"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    process = _start(
        [f"checkpoint={world['sft']}", f"parallel={parallel}", "attributes.helpfulness=4"], port, log, torchrun
    )
    try:
        assert _request(port, "POST", "/v1/chat/completions", request)[1]["choices"] == expected
        two_tokens, two_values, two_nemo = answers(port)
        assert two_tokens == tp1_tokens and two_nemo == tp1_nemo
        assert two_values == pytest.approx(tp1_values, abs=1e-4)  # the TP ranks sum partial products in another order
        streaming = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        streaming.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**request, "stream": True}),
            {"Content-Type": "application/json"},
        )
        response = streaming.getresponse()
        first = response.readline()
        [rank0] = [p for p in psutil.Process(process.pid).children() if p.environ().get("RANK") == "0"]
        rank0.send_signal(signal.SIGTERM)  # mid-stream: the answer is finished, then rank 0 releases rank 1
        rest = response.read().decode()
        assert first.startswith(b"data: {") and rest.rstrip().endswith("data: [DONE]")
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]  # both ranks exited 0
        assert "stopped by SIGTERM" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


def _write_team_adapter(sft: str, output: str) -> None:
    """LoRA adapters alone (random A and B, large enough to change greedy answers) on the served SFT checkpoint."""
    import torch

    from steerlm import runtime
    from steerlm.checkpoint.sharded import WeightsOnly, load_weights, resolve_checkpoint, save_checkpoint, saved_config
    from steerlm.checkpoint.sources import BaseWeights, WeightFormat
    from steerlm.config import LoraConfig, ParallelConfig, PrecisionConfig
    from steerlm.models import build_model_chunks, lora
    from steerlm.stages.export_source import saved_train_config

    path = resolve_checkpoint(sft)
    cfg = saved_train_config(saved_config(path))
    cfg = replace(cfg, lora=LoraConfig(rank=4, alpha=8.0), output_dir=output)
    layout = runtime.initialize(ParallelConfig(), seed=0)
    try:
        chunks = build_model_chunks(cfg.model, PrecisionConfig(), layout, seed=0)
        load_weights(path, chunks, layout, cfg.model)
        lora.attach(chunks, cfg.lora, seed=0)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in chunks[0].named_parameters():
                if lora.is_adapter(name):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        base = BaseWeights.of(WeightFormat.steerlm, path)
        save_checkpoint(Path(output), 0, WeightsOnly(chunks, base=base), layout, cfg)
    finally:
        runtime.shutdown()


def _merged_tokens(checkpoint: str, prompt: list[int], max_new_tokens: int) -> list[str]:
    """Greedy tokens (each decoded alone) of `checkpoint` read as its merged weights, in this process alone."""
    from steerlm import runtime
    from steerlm.config import ParallelConfig, PrecisionConfig
    from steerlm.inference.generate import SamplingParams
    from steerlm.inference.loading import load_generator

    layout = runtime.initialize(ParallelConfig(), seed=0)
    try:
        loaded = load_generator(checkpoint, layout, PrecisionConfig())
        [done] = loaded.generator.generate([prompt], [SamplingParams(max_new_tokens=max_new_tokens)])
        return [loaded.tokenizer.decode([token]) for token in done.token_ids]
    finally:
        runtime.shutdown()


@pytest.mark.slow
def test_a_profiles_lora_adapter_answers_as_its_merged_model(world: dict, tmp_path: Path) -> None:
    """`profiles.team.adapter`: the team's rows decode with its adapters beside rows of the served model alone, and
    answer token for token as the adapter checkpoint read as merged weights does, on the chat route and on raw text
    (`/v1/completions` with `model: sft:team`)."""
    from tests.multiproc import run_distributed

    adapter = tmp_path / "team_lora"
    run_distributed(_write_team_adapter, 1, str(world["sft"]), str(adapter))
    (tmp_path / "teams.yaml").write_text(
        f"defaults:\n  - serve\n  - _self_\nprofiles:\n  team:\n    adapter: {adapter}\n"
    )
    port, log = _free_port(), tmp_path / "server.log"
    from steerlm.config.store import CONF_DIR

    overrides = ["--config-dir", str(tmp_path), "--config-name", "teams", f"hydra.searchpath=[file://{CONF_DIR}]"]
    process = _start([*overrides, f"checkpoint={world['sft']}"], port, log)
    try:
        answers = {}
        for model in ("sft:team", "sft"):
            body = {"model": model, "messages": QUESTION, "max_tokens": 16, "logprobs": True}
            status, reply = _request(port, "POST", "/v1/chat/completions", body)
            assert status == 200, reply
            answers[model] = [token["token"] for token in reply["choices"][0]["logprobs"]["content"]]
        status, tokenized = _request(port, "POST", "/tokenize", {"model": "sft:team", "messages": QUESTION})
        assert status == 200, tokenized
        completed = {}  # raw text: the same prompt ids through /v1/completions, on the team's adapters and without
        for model in ("sft:team", "sft"):
            body = {"model": model, "prompt": tokenized["tokens"], "max_tokens": 8, "temperature": 0, "logprobs": 0}
            status, reply = _request(port, "POST", "/v1/completions", body)
            assert status == 200, reply
            completed[model] = [token.strip() for token in reply["choices"][0]["logprobs"]["tokens"]]
    finally:
        _stop(process, log)
    [merged] = run_distributed(_merged_tokens, 1, str(adapter), tokenized["tokens"], 16)
    assert answers["sft:team"] == merged[: len(answers["sft:team"])]
    assert answers["sft:team"] != answers["sft"]
    assert completed["sft:team"] == [token.strip() for token in merged[:8]] != completed["sft"]
