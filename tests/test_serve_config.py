"""Serving's configs and requests, without a server: the serve and chat configs compose and validate with each bad
key named, team profiles come from a YAML, chat messages map onto the SteerLM template or name the bad one, and the
streamed response text holds back the template's newline. A real server: tests/test_server.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from steerlm.config import ConfigError, compose, to_typed
from steerlm.config.inference import ChatConfig, ServeConfig
from steerlm.data.records import Role, Turn
from steerlm.inference import Delta, FinishReason
from steerlm.inference.steering import ChatMessage, RequestError, ResponseText


def test_chat_and_serve_configs_compose_validate_and_name_bad_keys(tmp_path: Path) -> None:
    checkpoint = f"checkpoint={tmp_path}"
    cfg = to_typed(
        compose(
            "serve",
            [
                checkpoint,
                "attributes.verbosity=4",
                "+attributes.wit=2",
                "parallel=tp2",
                f"apm_checkpoint={tmp_path}",
                "server.port=9000",
            ],
        ),
        ServeConfig,
    )
    cfg.validate()
    assert cfg.attributes["verbosity"] == 4 and cfg.attributes["wit"] == 2 and cfg.attributes["humor"] is None
    assert cfg.system_prompt.startswith("A chat between a curious user")
    chat = to_typed(compose("chat", [checkpoint, "sampling.temperature=0.7"]), ChatConfig)
    chat.validate()
    replace(cfg, parallel=replace(cfg.parallel, pipeline_model_parallel_size=2)).validate()  # the stages in turn
    bad = [
        (
            replace(cfg, parallel=replace(cfg.parallel, context_parallel_size=2)),
            "parallel.context_parallel_size",
            "splits no sequence",
        ),
        (
            replace(
                cfg,
                parallel=replace(cfg.parallel, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
            ),
            "parallel.virtual_pipeline_model_parallel_size",
            "one model chunk per pipeline stage",
        ),
        (
            replace(cfg, parallel=replace(cfg.parallel, sequence_parallel=True)),
            "parallel.sequence_parallel",
            "KV-cache",
        ),
        (replace(cfg, limits=replace(cfg.limits, max_n=32)), "limits.max_n", "never fits a batch"),
        (replace(cfg, limits=replace(cfg.limits, prefill_tokens=0)), "limits.prefill_tokens", "must be positive"),
        (replace(cfg, sampling=replace(cfg.sampling, max_tokens=5000)), "sampling.max_tokens", "limits.max_tokens"),
        (replace(cfg, sampling=replace(cfg.sampling, top_p=0.0)), "sampling.top_p", "[1e-06, 1]"),
        (replace(cfg, sampling=replace(cfg.sampling, temperature=1e-310)), "sampling.temperature", "0 or in"),
        (replace(cfg, sampling=replace(cfg.sampling, stop=["a"] * 5)), "sampling.stop", "limits.max_stop_strings"),
        (replace(cfg, sampling=replace(cfg.sampling, seed=2**63 - 2)), "sampling.seed", "2**63 - 8"),
        (replace(cfg, checkpoint=str(tmp_path / "missing")), "checkpoint", "recipes/train_sft.py"),
        (replace(cfg, apm_checkpoint=str(tmp_path / "missing")), "apm_checkpoint", "train_attribute_model"),
        (replace(cfg, ping_interval_s=3600.0), "ping_interval_s", "distributed_timeout_minutes"),
    ]
    for config, key, phrase in bad:
        with pytest.raises(ConfigError) as error:
            config.validate()
        assert error.value.key == key and phrase in str(error.value), str(error.value)


TEAMS = """
defaults:
  - serve
  - _self_
profiles:
  support: {attributes: {helpfulness: 4, verbosity: 1}, max_tokens: 64}
  kids: {attributes: {toxicity: 0}, system_prompt: be kind}
"""


def test_profiles_come_from_a_yaml_and_bad_profiles_or_key_files_are_named(tmp_path: Path) -> None:
    """Profiles are a dict of typed presets, written in a YAML that extends serve.yaml (Hydra cannot add a
    dataclass-valued key from the command line); each bad value names its key."""
    from steerlm.config.inference import ProfileConfig
    from steerlm.config.store import CONF_DIR

    (tmp_path / "teams.yaml").write_text(TEAMS)  # run as: recipes/serve.py --config-dir DIR --config-name teams
    overrides = [f"checkpoint={tmp_path}", f"hydra.searchpath=[file://{CONF_DIR}]"]
    cfg = to_typed(compose("teams", overrides, config_dir=tmp_path), ServeConfig)
    cfg.validate()
    assert cfg.profiles["support"] == ProfileConfig({"helpfulness": 4, "verbosity": 1}, None, 64, None)
    assert cfg.profiles["kids"].system_prompt == "be kind"
    bad = [
        (replace(cfg, profiles={"a b": ProfileConfig()}), "profiles.a b", "not a profile name"),
        (replace(cfg, profiles={"x": ProfileConfig(max_tokens=2000)}), "profiles.x.max_tokens", "limits.max_tokens"),
        (replace(cfg, api_keys=str(tmp_path / "keys")), "api_keys", "is not a file"),
    ]
    for config, key, phrase in bad:
        with pytest.raises(ConfigError) as error:
            config.validate()
        assert error.value.key == key and phrase in str(error.value), str(error.value)
    steering = _steering()
    with pytest.raises(ConfigError) as error:
        steering.preset({"verbosity": 9}, steering.defaults, "profiles.x.attributes")
    assert error.value.key == "profiles.x.attributes.verbosity" and "out of range" in str(error.value)


def _steering():
    from tests.test_chat import FakeService, ScriptedEngine

    return FakeService(ScriptedEngine([]), {}).steering


@pytest.mark.parametrize(
    "messages,param,phrase",
    [
        ([("assistant", "hi")], "messages[0].role", "expected a user message"),
        ([("user", "a"), ("user", "b")], "messages[1].role", "expected a assistant message"),
        ([("user", "a"), ("system", "b")], "messages[1].role", "must come before the first user message"),
        ([("tool", "a")], "messages[0].role", "role 'tool' is not supported"),
        ([("user", "a"), ("assistant", " ")], "messages[1].content", "must not be empty"),
        ([("user", "a"), ("assistant", "b")], "messages", "the last message must be from the user"),
    ],
)
def test_messages_map_onto_the_template_or_name_the_bad_one(messages, param: str, phrase: str) -> None:
    steering = _steering()
    with pytest.raises(RequestError) as error:
        steering.conversation([ChatMessage(role, text) for role, text in messages])
    assert error.value.param == param and phrase in error.value.message
    system, turns = steering.conversation(
        [
            ChatMessage("system", "x"),
            ChatMessage("developer", "y"),
            ChatMessage("user", "a"),
            ChatMessage("assistant", "b"),
            ChatMessage("user", "c"),
        ],
        {"verbosity": 1},
    )
    assert system == "x\ny" and turns[1] == Turn(Role.assistant, "b", {"verbosity": 1})


def test_response_text_holds_back_the_template_newline_until_it_is_not_the_last() -> None:
    text = ResponseText("\n")
    pushed = [
        text.push(Delta(0, piece, reason, tokens))
        for piece, reason, tokens in (
            ("two", None, 1),
            ("\n", None, 2),
            ("lines\n", None, 4),
            ("", FinishReason.stop, 4),
        )
    ]
    assert pushed == ["two", "", "\nlines", ""] and text.text == "two\nlines" and text.tokens == 4
    cut = ResponseText("\n")
    assert cut.push(Delta(0, "long\n", FinishReason.length)) == "long\n"  # no end of turn: the newline is text
