"""Gemma-shaped models (Gemma 1: Gemma-2B/7B, CodeGemma): a Llama with a GELU-gated MLP (`model.activation=geglu`,
GELU's tanh approximation), RMSNorm weights stored centred on zero (`model.layernorm_zero_centered_gamma`) and input
embeddings multiplied by sqrt(hidden_size) (`model.apply_embedding_scaling`, `megatron_compat.scaled_embedding`).

Checked against transformers' Gemma: a Gemma-shaped checkpoint with random norm weights, exported at TP=2, loads as
GemmaForCausalLM with steerlm's logits and imports back bitwise; the lean decoder's greedy tokens equal HF
`generate`'s; a regression APM exports as GemmaForSequenceClassification with steerlm's scores. Another tool's Gemmas
(tied; untied with heads of 32 channels and linear RoPE scaling), written by `save_pretrained`, convert at TP=2 with
their logits; the first releases' `hidden_act: gelu` reads as the approximation, as transformers reads it.
`init_from` checks the activation and the scaling; checkpoints written before the field existed read as unscaled; a
`.nemo` export is refused. Both decoders decode it as the recompute loop does (tests/test_generate.py, `gemma`); the
scaling itself: tests/test_megatron_compat_layers.py (item 14).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError
from steerlm.config.convert import ModelFormat
from steerlm.config.schema import Activation
from steerlm.models.hf_config import hf_model_fields
from steerlm.models.hf_llama import GEMMA, hf_architecture, hf_config_dict
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import GEMMA_MODEL, TEST_MODEL
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
    """GEMMA_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and converted back at TP=1."""
    return exported_at_tp2(layout, tmp_path_factory.mktemp("gemma"), GEMMA_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_an_export_at_tp2_is_an_hf_gemma_with_steerlm_logits_and_imports_back_bitwise(layout, exported) -> None:
    hf = check_export(layout, exported, GEMMA_MODEL, TOKENS, "GemmaForCausalLM")
    assert hf.config.hidden_act == "gelu_pytorch_tanh" and hf.config.tie_word_embeddings
    written = json.loads((exported["hf"] / "config.json").read_text())
    assert written["hidden_activation"] == "gelu_pytorch_tanh" and written["head_dim"] == 32


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_gemma_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


def test_a_regression_apm_exports_as_gemma_sequence_classification(layout, tmp_path: Path) -> None:
    untied = replace(GEMMA_MODEL, share_embeddings_and_output_weights=False)  # an APM has no output layer to tie
    check_apm_export(layout, tmp_path, untied, _randomise_vectors(layout), TOKENS, "GemmaForSequenceClassification")


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """transformers' Gemma (tied, heads of hidden / heads channels), and an untied one with heads of 32 channels and
    linear RoPE scaling, converted at TP=2 (Gemma-2B's single key/value head cannot be split over two ranks)."""
    torch.manual_seed(2)
    tied = transformers.GemmaConfig(**HF_SHAPE, head_dim=16)
    wide = transformers.GemmaConfig(
        **HF_SHAPE, head_dim=32, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    models = {"tied": transformers.GemmaForCausalLM(tied), "wide": transformers.GemmaForCausalLM(wide)}
    return converted_other_tools(models, tmp_path_factory.mktemp("gemma_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tied", "wide"])
def test_another_tool_s_gemma_converts_at_tp2_with_its_logits(layout, other_tools, name: str) -> None:
    source, _, run = other_tools[name]
    model, chunks = imported(layout, run)
    assert hf_architecture(model) == GEMMA and model.apply_embedding_scaling
    assert model.share_embeddings_and_output_weights == (name == "tied")
    assert (model.head_dim, model.rope_linear_factor) == ((16, None) if name == "tied" else (32, 2.0))
    check_same_logits(source, chunks, 40)


@pytest.mark.slow
def test_init_from_an_hf_gemma_checks_the_activation_and_the_scaling(other_tools) -> None:
    directory = str(other_tools["tied"][1])
    run = replace(GEMMA_MODEL, kv_channels=None)
    assert resolve_init_source("sft.init_from", directory, run) is not None
    for change, key in (
        ({"activation": Activation.swiglu}, "model.activation"),
        ({"apply_embedding_scaling": False}, "model.apply_embedding_scaling"),
        ({"layernorm_zero_centered_gamma": False}, "model.layernorm_zero_centered_gamma"),
    ):
        with pytest.raises(ConfigError) as error:
            resolve_init_source("sft.init_from", directory, replace(run, **change))
        assert error.value.key == key, str(error.value)


def test_the_first_releases_gelu_reads_as_the_approximation_and_a_config_without_tying_as_tied() -> None:
    """Gemma-7B's first config.json says `hidden_act: gelu`, which transformers reads as GELU's tanh approximation;
    GemmaConfig ties the embeddings unless told otherwise. Another activation is refused naming it."""
    written = {**hf_config_dict(GEMMA_MODEL), "hidden_act": "gelu"}
    del written["hidden_activation"], written["tie_word_embeddings"]
    assert transformers.GemmaConfig(**written).hidden_act == "gelu_pytorch_tanh"
    fields = hf_model_fields(written, "input", "x")
    assert fields["activation"] == Activation.geglu and fields["share_embeddings_and_output_weights"] is True
    assert fields["apply_embedding_scaling"] is True and fields["layernorm_zero_centered_gamma"] is True
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        hf_model_fields({**written, "hidden_act": "relu"}, "input", "x")


def test_hf_architecture_is_told_by_the_activation_the_norm_and_the_scaling() -> None:
    assert hf_architecture(GEMMA_MODEL) == GEMMA
    assert hf_config_dict(GEMMA_MODEL)["architectures"] == ["GemmaForCausalLM"]
    for change, problem in (
        ({"apply_embedding_scaling": False}, "apply_embedding_scaling must be true"),
        ({"layernorm_zero_centered_gamma": False}, "layernorm_zero_centered_gamma must be true"),
        ({"activation": Activation.gelu}, "activation must be geglu"),
    ):
        with pytest.raises(ValueError) as error:
            hf_architecture(replace(GEMMA_MODEL, **change))
        assert f"HF Gemma ({problem}" in str(error.value)
    with pytest.raises(ValueError, match="HF Llama .*apply_embedding_scaling must be false"):
        hf_architecture(replace(TEST_MODEL, apply_embedding_scaling=True))  # scaled embeddings: Gemma's alone


def test_a_checkpoint_written_before_the_field_existed_reads_as_unscaled(layout, tmp_path: Path) -> None:
    later = {"apply_embedding_scaling": replace(TEST_MODEL, apply_embedding_scaling=True)}
    check_fields_added(layout, tmp_path / "old", TEST_MODEL, later)


def test_a_nemo_export_of_a_gemma_is_refused_naming_the_format(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "sft", GEMMA_MODEL)
    with pytest.raises(ConfigError, match="is a Gemma .*no NeMo 1.x model") as error:
        convert(_convert(run, tmp_path / "x.nemo", to=ModelFormat.nemo), layout)
    assert error.value.key == "to" and "to=hf (GemmaForCausalLM)" in str(error.value)
