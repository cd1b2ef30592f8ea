"""Nemotron-shaped models, as NVIDIA's Nemotron-3/4 SteerLM and reward models are built: NeMo's `layernorm1p`
(`model.layernorm_zero_centered_gamma`: LayerNorm weights stored centred on zero, applied as 1 + w), a squared-ReLU
MLP, RoPE on half of each head's channels.

Checked against an independent implementation, transformers' Nemotron: a checkpoint exported at TP=2 loads as
NemotronForCausalLM with steerlm's logits and greedy tokens (the lean decoder's), and imports back bitwise; a
regression APM exports as NemotronForSequenceClassification with steerlm's scores (PEFT's LoRA on the export: in
tests/test_lora.py). Also: a fresh model's zero-centred norms compute what plain ones do; `init_from` an HF
Nemotron directory checks the run's norm (its config.json in transformers 4's keys or 5's); checkpoints written
before the field existed read as plain norms; a `.nemo` export writes `layernorm1p`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError, Normalization, PrecisionConfig
from steerlm.models import build_model_chunks
from steerlm.models.hf_llama import NEMOTRON, hf_architecture, hf_config_dict
from steerlm.models.nemo_config import nemo_model, nemo_model_config
from steerlm.models.sharding import named_global_parameters
from steerlm.training.init_from import resolve_init_source
from tests.conftest import NEMOTRON_MODEL, TEST_MODEL
from tests.hf_family_checks import (
    check_apm_export,
    check_export,
    check_fields_added,
    check_lean_greedy,
    exported_at_tp2,
)

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(4))  # ids the word tokenizer has


def _randomise_norms(chunks: list) -> None:
    """Every norm weight and bias random: a dropped `1 +`, a swapped or missing bias would show in the logits."""
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in named_global_parameters(chunks):
            if "layernorm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """A Nemotron-shaped SFT checkpoint, exported at TP=2 and imported back from that export at TP=1."""
    root = tmp_path_factory.mktemp("nemotron")
    return exported_at_tp2(layout, root, NEMOTRON_MODEL, _randomise_norms)


def test_fresh_zero_centred_norms_compute_what_plain_norms_do(layout) -> None:
    plain = replace(NEMOTRON_MODEL, layernorm_zero_centered_gamma=False)
    centred = build_model_chunks(NEMOTRON_MODEL, PrecisionConfig(), layout, seed=3)
    norms = [param for name, param in named_global_parameters(centred) if "layernorm" in name]
    assert len(norms) == 2 * (2 * TEST_MODEL.num_layers + 1)  # weight and bias of every norm
    assert all(not param.any() for param in norms)  # centred weights start at 0, i.e. a scale of 1
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        ours = centred[0](TOKENS, positions, None)
        theirs = build_model_chunks(plain, PrecisionConfig(), layout, seed=3)[0](TOKENS, positions, None)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_an_export_at_tp2_is_an_hf_nemotron_with_steerlm_logits_and_imports_back_bitwise(layout, exported) -> None:
    hf = check_export(layout, exported, NEMOTRON_MODEL, TOKENS, "NemotronForCausalLM")
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5 and hf.config.hidden_act == "relu2"


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_nemotron_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


def test_a_regression_apm_exports_as_nemotron_sequence_classification(layout, tmp_path: Path) -> None:
    check_apm_export(layout, tmp_path, NEMOTRON_MODEL, _randomise_norms, TOKENS, "NemotronForSequenceClassification")


def test_init_from_an_hf_nemotron_checks_the_run_s_norm(exported) -> None:
    assert resolve_init_source("sft.init_from", str(exported["hf"]), NEMOTRON_MODEL) is not None
    for model, key in (
        (replace(NEMOTRON_MODEL, layernorm_zero_centered_gamma=False), "model.layernorm_zero_centered_gamma"),
        (replace(NEMOTRON_MODEL, rotary_percent=1.0), "model.rotary_percent"),
        (TEST_MODEL, "model.normalization"),
    ):
        with pytest.raises(ConfigError) as error:
            resolve_init_source("sft.init_from", str(exported["hf"]), model)
        assert error.value.key == key, str(error.value)


def test_hf_architecture_is_told_by_the_norm_the_activation_and_the_rope(layout) -> None:
    assert hf_architecture(NEMOTRON_MODEL) == NEMOTRON and hf_config_dict(NEMOTRON_MODEL)["model_type"] == "nemotron"
    for change in (
        {"layernorm_zero_centered_gamma": False},  # a plain LayerNorm: neither family
        {"normalization": Normalization.RMSNorm},
        {"rope_scaling": True},
    ):
        with pytest.raises(ValueError, match="not an HF Llama .* nor an HF Nemotron"):
            hf_architecture(replace(NEMOTRON_MODEL, **change))


def test_a_checkpoint_written_before_the_field_existed_reads_as_plain_norms(layout, tmp_path: Path) -> None:
    plain = replace(NEMOTRON_MODEL, layernorm_zero_centered_gamma=False)
    check_fields_added(layout, tmp_path / "old", plain, {"layernorm_zero_centered_gamma": NEMOTRON_MODEL})


def test_a_nemo_export_writes_layernorm1p_and_reads_back_the_same_model() -> None:
    tokenizer = {"library": "sentencepiece", "model": "nemo:tokenizer.model"}
    config = nemo_model_config(
        NEMOTRON_MODEL, tensor_parallel=1, pipeline_parallel=1, dtype="fp32", tokenizer=tokenizer, tokenizer_ids=300
    )
    assert config["normalization"] == "layernorm1p" and config["activation"] == "squared-relu"
    read = nemo_model(config, "x.nemo/model_config.yaml", NEMOTRON_MODEL.padded_vocab_size).model
    for name in ("normalization", "layernorm_zero_centered_gamma", "activation", "rotary_percent"):
        assert getattr(read, name) == getattr(NEMOTRON_MODEL, name), name
    with pytest.raises(ValueError, match="no RMSNorm with zero-centred weights"):
        nemo_model_config(
            replace(TEST_MODEL, layernorm_zero_centered_gamma=True),
            tensor_parallel=1,
            pipeline_parallel=1,
            dtype="fp32",
            tokenizer=tokenizer,
            tokenizer_ids=300,
        )


def test_an_hf_nemotron_config_reads_the_same_from_transformers_4_and_5_keys(tmp_path: Path) -> None:
    """steerlm writes transformers 4's top-level `rope_theta` / `partial_rotary_factor`; transformers 5's
    `save_pretrained` nests them in `rope_parameters`. Both read as the same `model.*` fields."""
    from steerlm.models.hf_config import hf_model_fields

    ours = hf_config_dict(NEMOTRON_MODEL)
    fields = {k: v for k, v in ours.items() if k not in ("architectures", "model_type")}
    transformers.NemotronConfig(**fields).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "config.json").read_text())
    assert "partial_rotary_factor" not in theirs and theirs["rope_parameters"]["partial_rotary_factor"] == 0.5
    read = hf_model_fields(ours, "sft.init_from", "ours"), hf_model_fields(theirs, "sft.init_from", "theirs")
    assert read[0] == read[1] and read[0]["rotary_percent"] == NEMOTRON_MODEL.rotary_percent
