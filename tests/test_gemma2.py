"""Gemma 2-shaped models (Gemma-2-2B/9B/27B): a Gemma with norms of each sublayer's output
(`model.post_sublayer_norms`), soft-capped attention scores and logits (`model.attn_logit_softcapping`,
`model.final_logit_softcapping`) and the attention scale `model.query_pre_attn_scalar ** -0.5`
(`steerlm.megatron_compat.gemma2`).

Checked against transformers' Gemma 2 (eager attention, which caps the scores): a Gemma 2-shaped checkpoint with
random norm weights, exported at TP=2, loads as Gemma2ForCausalLM with steerlm's logits and imports back bitwise, and
the caps bite (without them the logits differ); the lean decoder's greedy tokens equal HF `generate`'s; a regression
APM exports as Gemma2ForSequenceClassification with steerlm's scores. Another tool's Gemma 2s (tied, with Gemma2Config's
own caps and a window of 64 positions on every other layer; untied, uncapped, with another scale), written by
`save_pretrained`, convert at TP=2 with their logits past the window. The chunked loss with a cap equals megatron's
(loss and gradients); Transformer Engine's layers are refused; a `.nemo` export is refused. Training at TP=2 with
sequence parallelism and at PP=2: tests/test_parallel_parity.py (`gemma2`); both decoders: tests/test_generate.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError
from steerlm.config.convert import ModelFormat
from steerlm.config.schema import TransformerImpl
from steerlm.config.validation import Accelerator, resolve_transformer_impl
from steerlm.models.hf_llama import GEMMA2, hf_architecture, hf_config_dict
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import GEMMA2_MODEL, GEMMA_MODEL
from tests.hf_family_checks import (
    check_apm_export,
    check_export,
    check_fields_added,
    check_lean_greedy,
    check_same_logits,
    converted_other_tools,
    exported_at_tp2,
    imported,
)
from tests.test_convert import _checkpoint, _convert
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """GEMMA2_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and converted back at TP=1."""
    return exported_at_tp2(layout, tmp_path_factory.mktemp("gemma2"), GEMMA2_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_an_export_at_tp2_is_an_hf_gemma2_with_steerlm_logits_and_imports_back_bitwise(layout, exported) -> None:
    hf = check_export(layout, exported, GEMMA2_MODEL, TOKENS, "Gemma2ForCausalLM")
    config = hf.config
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (0.05, 0.1)
    assert config.query_pre_attn_scalar == 24 and config.hidden_activation == "gelu_pytorch_tanh"
    assert config.sliding_window == 128 and config.layer_types == ["full_attention"] * 2
    with torch.no_grad():  # the caps bite: the same weights uncapped give other logits
        capped = hf(TOKENS).logits
        for layer in hf.model.layers:  # each attention reads its cap when built
            layer.self_attn.attn_logit_softcapping = None
        uncapped_scores = hf(TOKENS).logits
        config.final_logit_softcapping = None
        uncapped = hf(TOKENS).logits
    assert (capped - uncapped_scores).abs().max() > 1e-2 and (uncapped_scores - uncapped).abs().max() > 1e-1


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_gemma2_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


def test_a_regression_apm_exports_as_gemma2_sequence_classification(layout, tmp_path: Path) -> None:
    untied = replace(GEMMA2_MODEL, share_embeddings_and_output_weights=False)  # an APM has no output layer to tie
    check_apm_export(layout, tmp_path, untied, _randomise_vectors(layout), TOKENS, "Gemma2ForSequenceClassification")


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """transformers' Gemma 2 as Gemma2Config makes it (tied, caps 50 and 30, its scale 256, even layers attending to
    64 positions) with caps that bite at this size, and an untied one without caps, heads of 32 channels and the scale
    20, converted at TP=2."""
    torch.manual_seed(3)
    shape = {**HF_SHAPE, "num_hidden_layers": 3}
    capped = transformers.Gemma2Config(
        **shape, head_dim=16, attn_logit_softcapping=2.0, final_logit_softcapping=1.5, sliding_window=64
    )
    plain = transformers.Gemma2Config(
        **shape,
        head_dim=32,
        tie_word_embeddings=False,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        query_pre_attn_scalar=20,
    )
    models = {"capped": transformers.Gemma2ForCausalLM(capped), "plain": transformers.Gemma2ForCausalLM(plain)}
    return converted_other_tools(models, tmp_path_factory.mktemp("gemma2_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["capped", "plain"])
def test_another_tool_s_gemma2_converts_at_tp2_with_its_logits(layout, other_tools, name: str) -> None:
    source, _, run = other_tools[name]
    model, chunks = imported(layout, run)
    assert hf_architecture(model) == GEMMA2 and model.post_sublayer_norms and model.apply_embedding_scaling
    caps = (model.attn_logit_softcapping, model.final_logit_softcapping, model.query_pre_attn_scalar)
    assert caps == ((2.0, 1.5, 256) if name == "capped" else (None, None, 20))
    assert model.max_position_embeddings == 128
    window = (model.sliding_window, model.window_attn_skip_freq)
    assert window == ((64, 2) if name == "capped" else (None, None))  # Gemma2Config's layer types: every other one
    check_same_logits(source, chunks, 100)  # past the window


@pytest.mark.slow
def test_init_from_an_hf_gemma2_checks_the_norms_the_caps_the_scale_and_the_window(other_tools) -> None:
    directory = str(other_tools["capped"][1])
    run = replace(
        GEMMA2_MODEL,
        kv_channels=None,
        num_layers=3,
        sliding_window=64,
        window_attn_skip_freq=2,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=1.5,
        query_pre_attn_scalar=256,
    )
    assert resolve_init_source("sft.init_from", directory, run) is not None
    for change, key in (
        ({"post_sublayer_norms": False}, "model.post_sublayer_norms"),
        ({"attn_logit_softcapping": None}, "model.attn_logit_softcapping"),
        ({"final_logit_softcapping": 30.0}, "model.final_logit_softcapping"),
        ({"query_pre_attn_scalar": None}, "model.query_pre_attn_scalar"),
        ({"sliding_window": None, "window_attn_skip_freq": None}, "model.sliding_window"),
        ({"window_attn_skip_freq": None}, "model.window_attn_skip_freq"),
    ):
        with pytest.raises(ConfigError) as error:
            resolve_init_source("sft.init_from", directory, replace(run, **change))
        assert error.value.key == key, str(error.value)


def test_hf_architecture_is_told_by_the_post_norms_and_other_families_refuse_the_caps() -> None:
    assert hf_architecture(GEMMA2_MODEL) == GEMMA2
    written = hf_config_dict(replace(GEMMA2_MODEL, query_pre_attn_scalar=None))
    assert written["architectures"] == ["Gemma2ForCausalLM"] and written["query_pre_attn_scalar"] == 32
    assert hf_architecture(replace(GEMMA2_MODEL, post_sublayer_norms=False, **_NO_CAPS)) != GEMMA2
    with pytest.raises(ValueError) as error:
        hf_architecture(replace(GEMMA2_MODEL, post_sublayer_norms=False))
    assert "HF Gemma (attn_logit_softcapping must be null; final_logit_softcapping must be null;" in str(error.value)


_NO_CAPS = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "query_pre_attn_scalar": None}


def test_transformer_engine_s_layers_are_refused_and_auto_builds_the_local_ones() -> None:
    engine = replace(GEMMA2_MODEL, transformer_impl=TransformerImpl.transformer_engine)
    with pytest.raises(
        ConfigError, match="builds norms of each sublayer's output .* on megatron-core's own layers"
    ) as error:
        resolve_transformer_impl(engine, Accelerator.cuda)
    assert error.value.key == "model.transformer_impl"
    assert resolve_transformer_impl(GEMMA2_MODEL, Accelerator.cuda) == TransformerImpl.local
    capped_only = replace(GEMMA_MODEL, attn_logit_softcapping=50.0, transformer_impl=TransformerImpl.transformer_engine)
    with pytest.raises(ConfigError, match="builds soft-capped attention scores"):
        resolve_transformer_impl(capped_only, Accelerator.cuda)


def test_caps_and_scale_must_be_positive() -> None:
    for name in _NO_CAPS:
        with pytest.raises(ConfigError) as error:
            replace(GEMMA2_MODEL, **{name: 0.0}).validate()
        assert error.value.key == f"model.{name}"


def test_a_checkpoint_written_before_the_field_existed_has_no_post_norms(layout, tmp_path: Path) -> None:
    later = {"post_sublayer_norms": replace(GEMMA_MODEL, post_sublayer_norms=True)}
    check_fields_added(layout, tmp_path / "old", GEMMA_MODEL, later)


def test_a_nemo_export_of_a_gemma2_is_refused_naming_the_format(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "sft", GEMMA2_MODEL)
    with pytest.raises(ConfigError, match="is a Gemma .*no NeMo 1.x model") as error:
        convert(_convert(run, tmp_path / "x.nemo", to=ModelFormat.nemo), layout)
    assert "to=hf (Gemma2ForCausalLM)" in str(error.value)


def test_the_written_config_reads_back_as_the_model(tmp_path: Path) -> None:
    """What an export writes is what transformers' Gemma2Config reads: the caps, the scale, the window."""
    config = transformers.Gemma2Config(**hf_config_dict(GEMMA2_MODEL))
    assert config.query_pre_attn_scalar == 24 and config.final_logit_softcapping == 0.1
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(GEMMA2_MODEL)))
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "gemma2"
