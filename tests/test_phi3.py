"""Phi-3-family models (Phi3ForCausalLM: Phi-3, Phi-3.5 and Phi-4; LongRoPE's: tests/test_long_rope.py): a Llama's
layers, or ones with RoPE on a share of each head (`partial_rotary_factor`), whose checkpoints store q/k/v as one
`qkv_proj` ([all q heads; all k; all v]) and gate/up as one `gate_up_proj` ([gate; up], megatron's `linear_fc1` layout).

Checked against transformers' Phi3: another tool's Phi-3 models (grouped heads with RoPE on every channel, RoPE on half
of each head, a 64-position sliding window), written by `save_pretrained`, convert to steerlm at TP=2 with their logits;
the one with RoPE on every channel goes out as the Llama it computes, the one with partial RoPE as a Phi3ForCausalLM
(fused tensors) with steerlm's logits, whose lean-decoder greedy tokens are HF `generate`'s, and which converts back
bitwise; a regression APM of that shape exports as Phi3ForSequenceClassification; a RoPE scaling Phi-3 does not have
is refused naming it. A LoRA run started from a Phi-3 directory exports PEFT adapters for its fused projections, which
PEFT applies to that directory with steerlm's logits (the mapping of each adapter: tests/test_lora.py, `phi3-all`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError, ModelConfig, TrainConfig, compose, to_typed
from steerlm.config.schema import Accelerator
from steerlm.config.validation import validate_model_layout
from steerlm.models.hf_config import hf_model_fields
from steerlm.models.hf_llama import LLAMA, MISTRAL, PHI3, hf_architecture, hf_config_dict
from steerlm.training import build_training
from steerlm.training.init_from import load_init_weights, resolve_init_source
from tests.conftest import PHI3_MODEL, TEST_MODEL
from tests.hf_family_checks import (
    check_apm_export,
    check_export,
    check_lean_greedy,
    check_peft_on_hf_base,
    check_same_logits,
    converted_other_tools,
    exported_at_tp2,
    imported,
)
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def phi3_imports(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """transformers' Phi3ForCausalLM converted at TP=2 (`converted_other_tools`): RoPE on every channel, on half of
    each head, and layers that see 64 positions."""
    torch.manual_seed(1)
    shapes = {
        "phi3": {"sliding_window": None},
        "phi3_partial": {"sliding_window": None, "partial_rotary_factor": 0.5},
        "phi3_window": {"sliding_window": 64},
    }
    models = {
        name: transformers.Phi3ForCausalLM(transformers.Phi3Config(**HF_SHAPE, pad_token_id=0, **extra))
        for name, extra in shapes.items()
    }
    return converted_other_tools(models, tmp_path_factory.mktemp("phi3_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "phi3_partial", "phi3_window"])
def test_another_tool_s_phi3_converts_at_tp2_with_its_logits(layout, phi3_imports, name: str) -> None:
    source, _, run = phi3_imports[name]
    model, chunks = imported(layout, run)
    assert model.rotary_percent == (0.5 if name == "phi3_partial" else 1.0) and model.query_groups == 2
    assert model.max_position_embeddings == 128 and model.sliding_window == (64 if name == "phi3_window" else None)
    check_same_logits(source, chunks, 100)  # past the window
    # RoPE on every channel is a Llama, which transformers, vLLM and TGI load as the same function (a Mistral with a
    # window on every layer)
    assert hf_architecture(model) == {"phi3_partial": PHI3, "phi3_window": MISTRAL}.get(name, LLAMA)


@pytest.mark.slow
def test_init_from_a_phi3_directory_starts_from_its_weights_and_checks_its_shape(layout, phi3_imports) -> None:
    """`sft.init_from=<a Phi-3 directory>` (how a Phi-4 run starts) loads the fused tensors into megatron's layers:
    the run's first forward is transformers'; a `model.*` that differs is refused naming the field."""
    source, directory, _ = phi3_imports["phi3_partial"]
    model = replace(TEST_MODEL, rotary_percent=0.5, layernorm_epsilon=1e-6)
    setup = build_training(TrainConfig(model=model), layout)
    load_init_weights(resolve_init_source("sft.init_from", str(directory), model), setup, layout, model)
    tokens = TOKENS[:, :16]
    with torch.no_grad():
        ours = setup.chunks[0](tokens, torch.arange(16).expand_as(tokens), None)[..., :300]
        torch.testing.assert_close(source(tokens).logits, ours, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="holds an HF Phi3 with rotary_percent=0.5") as error:
        resolve_init_source("sft.init_from", str(directory), replace(model, rotary_percent=1.0))
    assert error.value.key == "model.rotary_percent"


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """A partial-RoPE SFT checkpoint with random norm weights, exported at TP=2, imported back at TP=1."""
    root = tmp_path_factory.mktemp("phi3_export")
    return exported_at_tp2(layout, root, PHI3_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_partial_rope_exports_at_tp2_as_an_hf_phi3_with_fused_tensors_and_imports_back_bitwise(
    layout, exported
) -> None:
    hf = check_export(layout, exported, PHI3_MODEL, TOKENS, "Phi3ForCausalLM")
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5 and hf.config.sliding_window is None
    with safetensors.safe_open(exported["hf"] / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert {"model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= names
    assert not any("q_proj" in name or "gate_proj" in name for name in names)


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_phi3_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


@pytest.mark.slow
def test_adapters_of_a_run_started_from_an_hf_phi3_export_for_its_fused_projections(
    layout, phi3_imports, tmp_path: Path
) -> None:
    """A LoRA run whose `init_from` is a Phi-3 directory (RoPE on every channel: the model itself exports as a Llama)
    writes PEFT adapters for the base's own `qkv_proj` and `gate_up_proj`; PEFT on that base gives steerlm's logits."""
    pytest.importorskip("peft")
    _, directory, run = phi3_imports["phi3"]
    base = transformers.Phi3ForCausalLM.from_pretrained(directory)
    adapter = check_peft_on_hf_base(layout, directory, run, tmp_path, base, TOKENS[:, :16])
    assert adapter["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_a_regression_apm_with_partial_rope_exports_as_phi3_sequence_classification(layout, tmp_path: Path) -> None:
    prepare = _randomise_vectors(layout)
    check_apm_export(layout, tmp_path, PHI3_MODEL, prepare, TOKENS, "Phi3ForSequenceClassification")


def test_only_partial_rope_goes_out_as_phi3() -> None:
    assert hf_architecture(TEST_MODEL) == LLAMA and hf_architecture(PHI3_MODEL) == PHI3
    config = hf_config_dict(PHI3_MODEL)
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["partial_rotary_factor"] == 0.5
    fields = hf_model_fields({**config, "pad_token_id": 0}, "input", "x")
    assert {name: fields[name] for name in ("rotary_percent", "num_query_groups", "kv_channels")} == {
        "rotary_percent": 0.5,
        "num_query_groups": 2,
        "kv_channels": 16,
    }


def test_a_rope_scaling_phi3_does_not_have_is_refused_naming_it() -> None:
    """Phi-3's RoPE is plain or LongRoPE (tests/test_long_rope.py); another scaling is refused naming it."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    config = {**hf_config_dict(TEST_MODEL), "model_type": "phi3", "rope_scaling": dynamic}
    with pytest.raises(ConfigError, match="rope scaling .*dynamic") as error:
        hf_model_fields(config, "input", "phi3_dynamic")
    assert error.value.key == "input" and "longrope or no scaling" in str(error.value)


def test_the_phi4_preset_is_phi_4_s_shape_and_its_layout_splits_it() -> None:
    """Phi-4's config.json; 10 query groups, so a tensor-parallel size must divide 10 (the preset's layout: TP=2)."""
    model: ModelConfig = to_typed(compose("demo", ["model=phi4"])).model
    assert (model.hidden_size, model.num_layers, model.num_attention_heads, model.query_groups) == (5120, 40, 40, 10)
    assert hf_architecture(model) == LLAMA  # RoPE on every channel: exported as the Llama it computes
    layouts = {name: to_typed(compose("demo", [f"parallel={name}"])).parallel for name in ("tp2_pp2", "tp4")}
    validate_model_layout(model, layouts["tp2_pp2"], Accelerator.cuda, this_machine=False)
    with pytest.raises(ConfigError, match=r"must divide the number of query groups \(10\)") as error:
        validate_model_layout(model, layouts["tp4"], Accelerator.cuda, this_machine=False)
    assert error.value.key == "parallel.tensor_model_parallel_size"
