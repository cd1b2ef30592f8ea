"""Qwen2-, Qwen3- and Mistral-shaped models. Qwen2 is a Llama with biases on the query, key and value projections alone
(`model.add_qkv_bias`: megatron's `add_qkv_bias`, NeMo's `qkv_bias`); Qwen3 a Llama with an RMSNorm of each query and
key head before RoPE (`model.qk_layernorm`), its heads often wider than hidden / heads (`model.kv_channels`); Mistral
computes what a Llama does, its layers attending to the last `sliding_window` positions (Mistral-7B-v0.1's 4,096) or,
from v0.2 on, to every position.

Checked against transformers' Qwen2, Qwen3 and Mistral: a Qwen2- (Qwen3-) shaped checkpoint with random biases (QK
norm weights), exported at TP=2, loads as Qwen2ForCausalLM (Qwen3ForCausalLM) with steerlm's logits and imports back
bitwise; the lean decoder's greedy tokens equal HF `generate`'s; a regression APM exports as the family's
SequenceClassification model with steerlm's scores. Another tool's Qwen2 and Qwen3 (tied embeddings, as their small
models have) and Mistral, written by transformers' `save_pretrained`, convert to steerlm at TP=2 with their logits. A
Mistral's sliding window becomes the imported model's positions and `init_from` refuses a run with more; the q/k/v
biases and QK norms are checked by `init_from`; checkpoints written before the fields existed read as neither; a
`.nemo` export writes `qkv_bias` (the archives themselves: tests/test_nemo_import.py) and refuses QK norms, which
NeMo 1.x's models lack. TP=2 training with both (megatron sums the QK norms' gradients over TP):
tests/test_parallel_parity.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError
from steerlm.config.convert import ModelFormat
from steerlm.models.hf_llama import LLAMA, MISTRAL, QWEN2, QWEN3, hf_architecture, hf_config_dict
from steerlm.models.nemo_config import nemo_model, nemo_model_config
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import QWEN2_MODEL, QWEN3_MODEL, TEST_MODEL, randomize_biases
from tests.hf_family_checks import (
    check_apm_export,
    check_export,
    check_fields_added,
    check_lean_greedy,
    check_same_logits,
    converted_other_tools,
    imported,
)
from tests.multiproc import run_distributed
from tests.test_convert import _checkpoint, _convert, _distributed_conversions

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(4))  # ids the word tokenizer has
# The shape of the other tools' models (Hugging Face's names): TEST_MODEL's.
HF_SHAPE = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
}


FAMILIES = {"qwen2": (QWEN2_MODEL, "Qwen2"), "qwen3": (QWEN3_MODEL, "Qwen3")}


def _randomise_vectors(layout):
    """Every linear bias and norm weight random (the same at every layout): a dropped or swapped q/k/v bias or QK
    norm would show in the logits."""

    def prepare(chunks: list) -> None:
        randomize_biases(chunks, layout)
        generator = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for name, param in named_global_parameters(chunks):
                if "layernorm" in name:
                    param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.3)

    return prepare


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family, a shaped SFT checkpoint with random biases and norm weights, exported at TP=2 and imported back
    at TP=1 (the four conversions in one two-rank launch)."""
    root = tmp_path_factory.mktemp("qwen")
    runs = {
        family: _checkpoint(layout, root / family / "sft", model, prepare=_randomise_vectors(layout))
        for family, (model, _) in FAMILIES.items()
    }
    run_distributed(
        _distributed_conversions, 2, [(str(run), str(root / family / "hf"), {}, 2, 1) for family, run in runs.items()]
    )
    for family in FAMILIES:
        convert(_convert(root / family / "hf", root / family / "back"), layout)
    return {
        family: {"run": runs[family], "hf": root / family / "hf", "back": root / family / "back"} for family in runs
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_at_tp2_is_an_hf_qwen_with_steerlm_logits_and_imports_back_bitwise(
    layout, exported, family: str
) -> None:
    model, name = FAMILIES[family]
    hf = check_export(layout, exported[family], model, TOKENS, f"{name}ForCausalLM")
    assert set(hf.config.layer_types) == {"full_attention"} and hf.config.rope_parameters["rope_theta"] == 1e6
    attention = hf.model.layers[1].self_attn
    if family == "qwen2":
        assert attention.k_proj.bias.abs().min() > 0  # the random biases came along
    else:
        assert hf.config.head_dim == 32 and not torch.equal(attention.q_norm.weight, attention.k_norm.weight)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_of_the_lean_decoder_equal_hf_qwen_generate(layout, exported, family: str) -> None:
    check_lean_greedy(layout, exported[family]["run"], exported[family]["hf"], TOKENS)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_regression_apm_exports_as_the_family_s_sequence_classification(layout, tmp_path: Path, family: str) -> None:
    model, name = FAMILIES[family]
    check_apm_export(layout, tmp_path, model, _randomise_vectors(layout), TOKENS, f"{name}ForSequenceClassification")


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """transformers' own models converted at TP=2 (`converted_other_tools`): a Qwen2 and a Qwen3 (heads of 32
    channels) with tied embeddings, a Mistral attending to every position, and one whose layers see 64 positions."""
    torch.manual_seed(0)
    models = {
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**HF_SHAPE, tie_word_embeddings=True, rope_theta=1e6)
        ),
        "qwen3": transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**HF_SHAPE, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)
        ),
        "mistral": transformers.MistralForCausalLM(transformers.MistralConfig(**HF_SHAPE, sliding_window=None)),
        "mistral_window": transformers.MistralForCausalLM(transformers.MistralConfig(**HF_SHAPE, sliding_window=64)),
    }
    return converted_other_tools(models, tmp_path_factory.mktemp("other_tools"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "mistral_window"])
def test_another_tool_s_qwen_and_mistral_convert_at_tp2_with_their_logits(layout, other_tools, name: str) -> None:
    source, _, run = other_tools[name]
    model, chunks = imported(layout, run)
    assert model.add_qkv_bias is (name == "qwen2") and not model.add_bias_linear
    assert model.qk_layernorm is (name == "qwen3") and model.head_dim == (32 if name == "qwen3" else 16)
    assert model.share_embeddings_and_output_weights is name.startswith("qwen")
    assert model.max_position_embeddings == 128
    assert model.sliding_window == (64 if name == "mistral_window" else None) and model.window_attn_skip_freq is None
    check_same_logits(source, chunks, 100)  # past the window
    # a Mistral without a window goes out as the Llama it is, one with a window as a Mistral
    family = {"qwen2": QWEN2, "qwen3": QWEN3, "mistral_window": MISTRAL}.get(name, LLAMA)
    assert hf_architecture(model) == family


@pytest.mark.slow
def test_init_from_checks_the_q_k_v_biases_the_qk_norms_and_a_sliding_window(other_tools) -> None:
    qwen2, qwen3, mistral = (other_tools[name][1] for name in ("qwen2", "qwen3", "mistral_window"))
    tied = replace(TEST_MODEL, share_embeddings_and_output_weights=True, rotary_base=1000000, layernorm_epsilon=1e-6)
    assert resolve_init_source("sft.init_from", str(qwen2), replace(tied, add_qkv_bias=True)) is not None
    with pytest.raises(ConfigError, match="holds an HF Qwen2 with add_qkv_bias=True") as error:
        resolve_init_source("sft.init_from", str(qwen2), tied)
    assert error.value.key == "model.add_qkv_bias"
    wide = replace(tied, kv_channels=32)
    assert resolve_init_source("sft.init_from", str(qwen3), replace(wide, qk_layernorm=True)) is not None
    for model, key in ((wide, "model.qk_layernorm"), (replace(tied, qk_layernorm=True), "model.kv_channels")):
        with pytest.raises(ConfigError) as error:
            resolve_init_source("sft.init_from", str(qwen3), model)
        assert error.value.key == key, str(error.value)
    window = replace(TEST_MODEL, layernorm_epsilon=1e-6, sliding_window=64)
    assert resolve_init_source("apm.init_from", str(mistral), window) is not None
    with pytest.raises(ConfigError, match="holds an HF Mistral with sliding_window=64") as error:
        resolve_init_source("apm.init_from", str(mistral), replace(window, sliding_window=None))
    assert error.value.key == "model.sliding_window" and "set model.sliding_window=64" in str(error.value)


def test_hf_architecture_is_told_by_the_q_k_v_biases_and_the_qk_norms(layout) -> None:
    assert hf_architecture(QWEN2_MODEL) == QWEN2 and hf_architecture(QWEN3_MODEL) == QWEN3
    config = hf_config_dict(QWEN2_MODEL)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert not config["use_sliding_window"] and "attention_bias" not in config
    config = hf_config_dict(QWEN3_MODEL)
    assert config["model_type"] == "qwen3" and config["head_dim"] == 32 and config["attention_bias"] is False
    with pytest.raises(ValueError, match=r"HF Qwen2 \(qk_layernorm must be false\) nor an HF Qwen3 \(add_qkv_bias"):
        hf_architecture(replace(QWEN3_MODEL, add_qkv_bias=True))  # both: no HF family has that
    with pytest.raises(ValueError, match="not an HF Llama .* nor an HF Nemotron .* nor an HF Qwen2") as error:
        hf_architecture(replace(TEST_MODEL, add_bias_linear=True))  # biases on every linear layer: none
    assert "add_bias_linear must be false" in str(error.value)
    with pytest.raises(ConfigError, match="is implied by model.add_bias_linear=true") as refused:
        replace(QWEN2_MODEL, add_bias_linear=True).validate()
    assert refused.value.key == "model.add_qkv_bias"


def test_a_checkpoint_written_before_the_fields_existed_reads_as_neither(layout, tmp_path: Path) -> None:
    later = {"add_qkv_bias": QWEN2_MODEL, "qk_layernorm": replace(TEST_MODEL, qk_layernorm=True)}
    check_fields_added(layout, tmp_path / "old", TEST_MODEL, later)


def test_a_nemo_export_writes_qkv_bias_and_reads_back_the_same_model() -> None:
    tokenizer = {"library": "sentencepiece", "model": "nemo:tokenizer.model"}
    config = nemo_model_config(
        QWEN2_MODEL, tensor_parallel=1, pipeline_parallel=1, dtype="fp32", tokenizer=tokenizer, tokenizer_ids=300
    )
    assert config["qkv_bias"] is True and config["bias"] is False
    assert nemo_model(config, "x.nemo/model_config.yaml", QWEN2_MODEL.padded_vocab_size).model.add_qkv_bias
    both = {**config, "bias": True}  # NeMo's `bias` puts biases on q/k/v too: one model, whatever qkv_bias says
    read = nemo_model(both, "x.nemo/model_config.yaml", QWEN2_MODEL.padded_vocab_size).model
    assert read.add_bias_linear and not read.add_qkv_bias


def test_a_nemo_export_of_qk_norms_is_refused_naming_the_format(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "qwen3", QWEN3_MODEL)
    with pytest.raises(ConfigError, match="which no NeMo 1.x model NeMo-Aligner restores has") as error:
        convert(_convert(run, tmp_path / "x.nemo", to=ModelFormat.nemo), layout)
    assert error.value.key == "to" and "to=hf" in str(error.value) and not (tmp_path / "x.nemo").exists()
