"""Gemma 3-shaped models (Gemma-3-1B, and the text model of the 4B, 12B and 27B): a Gemma 2 with norms of each query and
key head whose sliding-window layers rotate with plain RoPE of their own base (`model.rope_local_base_freq`), the others
with `model.rotary_base` and its scaling (`steerlm.megatron_compat.scaled_rope.use_local_rope`).

Checked against transformers' Gemma 3: a Gemma 3-shaped checkpoint with random norm weights (a window of 6 positions on
its first layer with base 100, linear scaling x4 on the second), exported at TP=2, loads as Gemma3ForCausalLM with
steerlm's logits and imports back bitwise, and the local RoPE bites (HF's model with one table gives other logits);
the lean decoder's greedy tokens equal HF `generate`'s; a regression APM exports as
Gemma3TextForSequenceClassification with steerlm's scores. Another tool's Gemma 3s (Gemma3TextConfig's five sliding
layers of six with linear scaling x8; layer types of its own with another local base), written by `save_pretrained`,
convert at TP=2 with their logits past the window, as does a Gemma3ForConditionalGeneration's language model in
either layout of its tensors, and a LoRA run started from that one exports PEFT adapters of its language model alone;
transformers 4's config.json keys read as transformers 5's. Training at TP=2 with sequence parallelism and at PP=2:
tests/test_parallel_parity.py (`gemma2`, which has the local RoPE); both decoders: tests/test_generate.py (`gemma3`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerlm.config import ConfigError
from steerlm.config.convert import ModelFormat
from steerlm.models.hf_config import hf_model_fields
from steerlm.models.hf_llama import GEMMA2, GEMMA3, SafetensorsWeights, hf_architecture, hf_config_dict
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import GEMMA2_MODEL, GEMMA3_MODEL
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
from tests.test_convert import _checkpoint, _convert
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """GEMMA3_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and converted back at TP=1."""
    return exported_at_tp2(layout, tmp_path_factory.mktemp("gemma3"), GEMMA3_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_an_export_at_tp2_is_an_hf_gemma3_with_steerlm_logits_and_imports_back_bitwise(layout, exported) -> None:
    hf = check_export(layout, exported, GEMMA3_MODEL, TOKENS, "Gemma3ForCausalLM")
    config = hf.config
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 6
    assert config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 100.0}
    full = config.rope_parameters["full_attention"]
    assert (full["rope_type"], full["factor"], full["rope_theta"]) == ("linear", 4.0, 10000.0)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (None, None)
    assert config.query_pre_attn_scalar == 24
    rotary = hf.model.rotary_emb
    with torch.no_grad():  # the local RoPE bites: with the full layer's frequencies on both layers, other logits
        both = hf(TOKENS).logits
        rotary.sliding_attention_inv_freq.copy_(rotary.full_attention_inv_freq)
        one_table = hf(TOKENS).logits
    assert (both - one_table).abs().max() > 1e-2


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_gemma3_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


def test_a_regression_apm_exports_as_gemma3_sequence_classification(layout, tmp_path: Path) -> None:
    untied = replace(GEMMA3_MODEL, share_embeddings_and_output_weights=False)  # an APM has no output layer to tie
    classifier = "Gemma3TextForSequenceClassification"
    check_apm_export(layout, tmp_path, untied, _randomise_vectors(layout), TOKENS, classifier)


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """transformers' Gemma 3 as Gemma3TextConfig makes it (tied, five sliding layers of six with a window of 16, RoPE
    bases 1M and 10k) with Gemma-3-4B's linear scaling x8, one with layer types of its own (every other layer sliding)
    and a local base of 500, and a Gemma3ForConditionalGeneration whose language model is that one (beside a tiny
    vision tower), converted at TP=2."""
    torch.manual_seed(3)
    shape = {**HF_SHAPE, "head_dim": 16}
    pattern = transformers.Gemma3TextConfig(
        **{**shape, "num_hidden_layers": 6},
        sliding_window=16,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    own = transformers.Gemma3TextConfig(
        **{**shape, "num_hidden_layers": 3},
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_local_base_freq=500.0,
        query_pre_attn_scalar=20,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    multimodal = transformers.Gemma3Config(text_config=own, vision_config=vision, mm_tokens_per_image=4)
    models = {
        "pattern": transformers.Gemma3ForCausalLM(pattern),
        "own": transformers.Gemma3ForCausalLM(own),
        "multimodal": transformers.Gemma3ForConditionalGeneration(multimodal),
    }
    return converted_other_tools(models, tmp_path_factory.mktemp("gemma3_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pattern", "own"])
def test_another_tool_s_gemma3_converts_at_tp2_with_its_logits(layout, other_tools, name: str) -> None:
    source, _, run = other_tools[name]
    model, chunks = imported(layout, run)
    assert hf_architecture(model) == GEMMA3 and model.qk_layernorm and model.post_sublayer_norms
    assert (model.attn_logit_softcapping, model.final_logit_softcapping) == (None, None)
    assert (model.sliding_window, model.window_attn_skip_freq) == ((16, 6) if name == "pattern" else (16, 2))
    bases = (model.rotary_base, model.rope_local_base_freq, model.rope_linear_factor)
    assert bases == ((1000000, 10000, 8.0) if name == "pattern" else (1000000, 500, None))
    check_same_logits(source, chunks, 100)  # past the window


def _first_layout(name: str) -> str:
    """A Gemma3ForConditionalGeneration tensor's name as Google's checkpoints were first written (transformers 4.50)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    return "language_model." + name if name.startswith("lm_head.") else name.removeprefix("model.")


@pytest.mark.slow
def test_a_multimodal_gemma3_s_language_model_converts_in_either_layout_with_its_logits(
    layout, other_tools, tmp_path: Path
) -> None:
    """Its text model's tensors come in under a Gemma3ForCausalLM's names, transformers 4.52+'s layout
    (`model.language_model.*`) and the first one (`language_model.model.*`); the vision tower's are left out."""
    source, directory, run = other_tools["multimodal"]
    model, chunks = imported(layout, run)
    assert hf_architecture(model) == GEMMA3 and model.num_layers == 3 and model.rope_local_base_freq == 500
    check_same_logits(source, chunks, 100)
    first = tmp_path / "first"
    shutil.copytree(directory, first)
    for file in first.glob("*.safetensors"):
        save_file({_first_layout(k): v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    weights = SafetensorsWeights(first)
    assert weights.left_out and all(
        name.startswith(("vision_tower.", "multi_modal_projector.")) for name in weights.left_out
    )
    assert "model.layers.0.self_attn.q_norm.weight" in weights and "language_model.model.norm.weight" not in weights
    convert(_convert(first, tmp_path / "first_steerlm"), layout)
    check_same_logits(source, imported(layout, tmp_path / "first_steerlm")[1], 100)


@pytest.mark.slow
def test_adapters_of_a_run_started_from_a_multimodal_gemma3_attach_to_its_language_model(
    layout, other_tools, tmp_path: Path
) -> None:
    """PEFT's adapters of a LoRA run whose `init_from` is a Gemma3ForConditionalGeneration name its language model's
    layers (`model.language_model.layers.N`), and its targets those alone (its vision tower has q/k/v_proj too): PEFT
    on that multimodal base adapts the language model's 21 projections and gives steerlm's logits."""
    pytest.importorskip("peft")
    _, directory, run = other_tools["multimodal"]
    base = transformers.Gemma3ForConditionalGeneration.from_pretrained(directory)
    adapter = check_peft_on_hf_base(layout, directory, run, tmp_path, base, TOKENS[:, :16])
    names = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(name.startswith("base_model.model.model.language_model.layers.") for name in names)
    adapted = [name for name, module in base.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 3 * 7 and all(".language_model.layers." in name for name in adapted), adapter
    assert adapter["target_modules"].startswith(r"model\.language_model\.layers\.\d+")  # not the vision tower's


@pytest.mark.slow
def test_init_from_an_hf_gemma3_checks_the_local_base(other_tools) -> None:
    directory = str(other_tools["own"][1])
    run = replace(
        GEMMA3_MODEL,
        kv_channels=16,
        num_layers=3,
        sliding_window=16,
        rope_linear_factor=None,
        rotary_base=1000000,
        rope_local_base_freq=500,
        query_pre_attn_scalar=20,
    )
    assert resolve_init_source("sft.init_from", directory, run) is not None
    with pytest.raises(ConfigError) as error:
        resolve_init_source("sft.init_from", directory, replace(run, rope_local_base_freq=10000))
    assert error.value.key == "model.rope_local_base_freq" and "set model.rope_local_base_freq=500" in str(error.value)


def test_transformers_4_config_keys_read_as_transformers_5_s() -> None:
    """Gemma-3-1B's config.json as transformers 4.50 wrote it (`rope_local_base_freq`, `sliding_window_pattern`, no
    layer types) and Gemma-3-4B's text model (`rope_scaling` linear x8) give the fields transformers 5's keys give."""
    one_b = {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    four_b = {**one_b, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    for written in (one_b, four_b):
        fields = hf_model_fields(written, "sft.init_from", "x")
        modern = transformers.Gemma3TextConfig(**{k: v for k, v in written.items() if k != "model_type"})
        assert fields == hf_model_fields(modern.to_dict(), "sft.init_from", "x")
        assert (fields["sliding_window"], fields["window_attn_skip_freq"]) == (512, 6)
        assert (fields["rotary_base"], fields["rope_local_base_freq"]) == (1000000, 10000)
        assert fields["qk_layernorm"] and fields["query_pre_attn_scalar"] == 256
    assert hf_model_fields(four_b, "k", "x")["rope_linear_factor"] == 8.0
    with pytest.raises(ConfigError, match="use_bidirectional_attention=True"):
        hf_model_fields({**one_b, "use_bidirectional_attention": True}, "k", "x")


def test_hf_architecture_is_told_by_the_qk_norms_and_the_local_base() -> None:
    assert hf_architecture(GEMMA3_MODEL) == GEMMA3 and hf_architecture(GEMMA2_MODEL) == GEMMA2
    written = hf_config_dict(GEMMA3_MODEL)
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["rope_local_base_freq"] == 100.0
    assert written["sliding_window_pattern"] == 2 and written["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    config = transformers.Gemma3TextConfig(**written)  # what an export writes is what transformers reads
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 100.0
    with pytest.raises(ValueError, match=r"HF Gemma3 \(rope_local_base_freq must be set"):
        hf_architecture(replace(GEMMA3_MODEL, rope_local_base_freq=None))
    with pytest.raises(ValueError) as error:
        hf_architecture(replace(GEMMA3_MODEL, window_attn_skip_freq=None))
    assert "HF Gemma3 (window_attn_skip_freq must be set" in str(error.value)
    message = str(error.value)
    assert "HF Gemma2 (qk_layernorm must be false; rope_linear_factor must be null (linear scaling); " in message
    assert "window_attn_skip_freq must be 2; rope_local_base_freq must be null) nor an HF Gemma3" in message


def test_the_local_base_is_validated_checked_on_init_from_and_refused_on_nemo_export(layout, tmp_path: Path) -> None:
    for changes, key in (
        ({"rope_local_base_freq": 0}, "model.rope_local_base_freq"),
        ({"sliding_window": None, "window_attn_skip_freq": None}, "model.rope_local_base_freq"),
        ({"rope_linear_factor": None, "rope_yarn_factor": 2.0}, "model.rope_local_base_freq"),
    ):
        with pytest.raises(ConfigError) as refused:
            replace(GEMMA3_MODEL, **changes).validate()
        assert refused.value.key == key, changes
    run = _checkpoint(layout, tmp_path / "sft", GEMMA3_MODEL)
    with pytest.raises(ConfigError, match="was written for model.rope_local_base_freq=100") as error:
        resolve_init_source("sft.init_from", str(run), replace(GEMMA3_MODEL, rope_local_base_freq=10000))
    assert error.value.key == "model.rope_local_base_freq"
    with pytest.raises(ConfigError, match="no NeMo 1.x model") as error:
        convert(_convert(run, tmp_path / "x.nemo", to=ModelFormat.nemo), layout)
    assert "to=hf (Gemma3ForCausalLM)" in str(error.value)


def test_the_written_config_reads_back_as_the_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(GEMMA3_MODEL)))
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "gemma3_text"
