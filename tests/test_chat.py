"""The chat CLI: commands steer the next prompt, errors never end the session, replies stream without the
template's newline, and `recipes/chat.py` chats with a trained checkpoint fed from stdin."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from steerlm.config import AttributesConfig, ConfigError
from steerlm.config.inference import SamplingDefaults
from steerlm.data.attribute_lines import AttributeLines
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.inference import Delta, FinishReason
from steerlm.inference.chat import ChatSession
from steerlm.inference.engine import GenerationJob
from steerlm.inference.steering import ChatMessage, Steering
from steerlm.tokenizers import WordTokenizer
from tests.recipe_runner import ROOT, recipe_command, recipe_env

WORDS = (
    "hello again what does zog eat figs and nuts System User Assistant be brief helpfulness correctness "
    "coherence complexity verbosity 0 1 2 3 4"
)
# helpfulness, correctness, coherence, complexity, verbosity; 0-4; no request defaults of its own, so each test
# sees only the attributes it sets (test_unset_attributes_take_the_schemas_best_response covers them)
SCHEMA = AttributesConfig(request_defaults={}).schema()


class ScriptedEngine:
    """Answers every job with `words`, one delta per word and the template's newline before the stop."""

    def __init__(self, words: list[str], error: Exception | None = None) -> None:
        self.words, self.error, self.jobs = words, error, []

    def submit(self, job: GenerationJob) -> None:
        self.jobs.append(job)
        if self.error is not None:
            job.deliver(self.error)
            return
        for index, word in enumerate(self.words):
            job.deliver([Delta(0, word if index == 0 else " " + word)])
        job.deliver([Delta(0, "\n", FinishReason.stop)])
        job.deliver(None)


class FakeService:
    def __init__(self, engine: ScriptedEngine, defaults: dict) -> None:
        self.tokenizer = WordTokenizer.build([WORDS])
        self.engine = engine
        self.steering = Steering(SteerLMTemplate(SCHEMA), self.tokenizer, defaults, "be brief", 1000)


def _session(words=("figs", "and", "nuts"), defaults=None, error=None) -> tuple[ChatSession, FakeService, io.StringIO]:
    service = FakeService(ScriptedEngine(list(words), error), defaults or {"verbosity": 2, "humor": None})
    out = io.StringIO()
    return ChatSession(service, SamplingDefaults(max_tokens=7), out), service, out


def _prompts(service: FakeService) -> list[str]:
    return [service.tokenizer.decode(job.prompts[0]) for job in service.engine.jobs]


def test_commands_steer_the_next_prompt_and_the_history_keeps_each_turns_attributes() -> None:
    session, service, out = _session()
    session.run(
        [
            "hello",
            "/set helpfulness 4",
            "/unset verbosity",
            "/system",
            "what does zog eat",
            "/show",
            "/reset",
            "/show",
            "again",
            "/quit",
            "never read",
        ]
    )
    first, second, third = _prompts(service)
    assert first.endswith("<extra_id_1>Assistant\n<extra_id_2>verbosity:2\n")
    assert first.startswith("<s><extra_id_0>System\nbe brief\n")
    # the first turn keeps the values it was generated with; the new turn has only helpfulness, no system prompt
    assert second.startswith(
        "<s><extra_id_0>System\n\n<extra_id_1>User\nhello\n<extra_id_1>Assistant\n"
        "<extra_id_2>verbosity:2\nfigs and nuts\n<extra_id_1>User\nwhat does zog eat\n"
    )
    assert second.endswith("<extra_id_2>helpfulness:4\n")
    assert third == first.replace("hello", "again")  # /reset: no turns, configured attributes and system prompt
    text = out.getvalue()
    assert "figs and nuts\n" in text and "figs and nuts\n\n" not in text  # the template's newline is not shown
    assert "attributes: helpfulness:4  unset: correctness, coherence, complexity, verbosity" in text
    assert "system: ''  turns: 4" in text and "system: 'be brief'  turns: 0" in text
    assert service.engine.jobs[0].params[0].max_new_tokens == 7


def test_set_takes_an_attribute_string_laid_over_the_current_values() -> None:
    session, service, out = _session()
    session.run(["/set helpfulness:4, correctness:3", "hello", "/set helpfulness:1,verbosity:0", "hi"])
    first, second = _prompts(service)
    assert first.endswith("<extra_id_2>helpfulness:4,correctness:3,verbosity:2\n")
    assert second.endswith("<extra_id_2>helpfulness:1,correctness:3,verbosity:0\n")
    assert session.attributes == {"helpfulness": 1, "correctness": 3, "verbosity": 0}


def test_show_names_the_values_no_trained_attribute_line_carried() -> None:
    session, service, out = _session()
    assert service.steering.untrained({"verbosity": 2}) == []  # no lines recorded: nothing to say
    service.steering.trained = AttributeLines(5, {"verbosity": {"0": 3, "1": 2}, "helpfulness": {"4": 5}})
    session.run(["/show", "/set verbosity 1", "/set helpfulness 3", "/set helpfulness 4"])
    shown = [line for line in out.getvalue().splitlines() if line.startswith("attributes:")]
    assert (
        shown[0]
        == "attributes: verbosity:2  unset: helpfulness, correctness, coherence, complexity  never trained: verbosity:2"
    )
    assert "never trained" not in shown[1]
    assert shown[2].endswith("never trained: helpfulness:3") and "never trained" not in shown[3]


@pytest.mark.parametrize(
    "line,message",
    [
        ("/set humor 3", "schema 'helpsteer2' has no attribute 'humor'; its attributes are helpfulness, correctness"),
        ("/set verbosity 9", "attributes.verbosity=9.0 is out of range: verbosity takes an integer from 0 to 4"),
        ("/set verbosity 2.5", "attributes.verbosity=2.5 is not an integer: verbosity takes an integer from 0 to 4"),
        ("/set verbosity high", "'high' is not a number"),
        ("/set verbosity", "usage: /set NAME VALUE, /set NAME:VALUE,NAME:VALUE or /unset NAME"),
        ("/set helpfulness:4,verbosity", "attributes: 'verbosity' is not name:value"),
        ("/set helpfulness:4,helpfulness:3", "attributes: helpfulness is given twice"),
        ("/set helpfulness:4,verbosity:9", "attributes.verbosity=9.0 is out of range"),
        ("/unset wit", "schema 'helpsteer2' has no attribute 'wit'"),
        ("/bogus", "unknown command /bogus; /help lists the commands"),
    ],
)
def test_a_bad_command_prints_the_reason_and_the_session_goes_on(line: str, message: str) -> None:
    session, service, out = _session()
    session.run([line, "hello"])
    assert f"error: {message}" in out.getvalue()
    assert len(service.engine.jobs) == 1 and session.attributes == {"verbosity": 2}


def test_a_failed_reply_is_reported_and_not_kept() -> None:
    session, service, out = _session(error=ValueError("the model broke"))
    session.run(["hello"])
    assert "error: the model broke" in out.getvalue() and session.turns == []


def test_a_conversation_longer_than_the_model_reads_is_refused_before_generating() -> None:
    session, service, out = _session()
    session.steering.max_prompt_tokens = 12
    session.run(["what does zog eat " * 5])
    assert "this model reads at most 12" in out.getvalue() and service.engine.jobs == []


def test_default_attributes_the_schema_lacks_stop_the_start() -> None:
    with pytest.raises(ConfigError) as error:
        _session(defaults={"humor": 2})
    assert error.value.key == "attributes.humor" and "schema 'helpsteer2' has no attribute 'humor'" in str(error.value)
    with pytest.raises(ConfigError) as error:
        _session(defaults={"verbosity": 5})
    assert error.value.key == "attributes.verbosity" and "integer from 0 to 4" in str(error.value)


def test_unset_attributes_take_the_schemas_best_response() -> None:
    """A SteerLM model is trained on complete attribute lines; a request that sets a few gets the schema's best
    response for the rest (HelpSteer2's: Nemotron-4-340B-Reward's documented default), not a partial line."""
    tokenizer = WordTokenizer.build([WORDS])
    shipped = AttributesConfig().schema()  # helpsteer2, request_defaults null: its best response

    def line(steering: Steering, requested: dict | None = None) -> str:
        labels = steering.labels(requested)
        system, turns = steering.conversation([ChatMessage("user", "hello")], labels)
        return tokenizer.decode(steering.prompt_ids(system, turns, labels)).rpartition("<extra_id_1>Assistant\n")[2]

    steering = Steering(SteerLMTemplate(shipped), tokenizer, {"humor": None}, "be brief", 1000)
    best = "<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2\n"
    assert line(steering) == best
    assert line(steering, {"verbosity": 0}) == best.replace("verbosity:2", "verbosity:0")
    assert line(steering, {"complexity": None}) == best.replace("complexity:2,", "")  # a request may unset one
    configured = Steering(SteerLMTemplate(shipped), tokenizer, {"verbosity": 4}, "be brief", 1000)
    assert line(configured) == best.replace("verbosity:2", "verbosity:4")  # configured values over the schema's
    plain = SteerLMTemplate(shipped, TemplateConfig(condition_on_attributes=False))
    assert line(Steering(plain, tokenizer, {}, "be brief", 1000)) == ""  # a plain-SFT model reads no line
    # NeMo-Aligner's helpfulness-only schema is part of the shipped ones: their best response for its attribute
    only = AttributesConfig(name="helpfulness_only", attributes=["helpfulness"]).schema()
    assert line(Steering(SteerLMTemplate(only), tokenizer, {}, "be brief", 1000)) == "<extra_id_2>helpfulness:4\n"
    custom = AttributesConfig(name="mine", attributes=["helpfulness", "brevity"]).schema()
    assert line(Steering(SteerLMTemplate(custom), tokenizer, {}, "be brief", 1000)) == ""  # no best response known
    with pytest.raises(ConfigError) as error:
        AttributesConfig(request_defaults={"verbosity": 7}).schema()
    assert error.value.key == "attributes.request_defaults.verbosity" and "outside [0, 4]" in str(error.value)


@pytest.mark.slow
def test_chat_recipe_streams_replies_from_stdin(steerable: dict, tmp_path: Path) -> None:
    import subprocess

    lines = ["What color is Tanlinyal?", "/set verbosity 0", "/set humor 9", "What does Miveto eat?", "/show", "/quit"]
    result = subprocess.run(
        recipe_command("chat", [f"checkpoint={steerable['sft']}", "attributes.verbosity=3", "sampling.max_tokens=40"]),
        input="\n".join(lines) + "\n",
        cwd=ROOT,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    best = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:2"
    assert "schema 'steerlm_oasst'" in out and f"attributes: {best},verbosity:3" in out
    assert "error: attributes.humor=9.0 is out of range: humor takes an integer from 0 to 4" in out
    assert f"attributes: {best},verbosity:0" in out and "turns: 4" in out
    replies = [line for line in out.split("> ") if line and not line.startswith(("attributes", "error", "steerlm"))]
    assert replies and all(reply.strip() for reply in replies), out
