"""YaRN as transformers computes it (Qwen2.5 and Qwen3 past 32k positions, as their model cards enable it in
config.json): `model.rope_yarn_*`, `steerlm.models.rope`, `steerlm.megatron_compat.scaled_rope`.

Checked against transformers: the inverse frequencies and attention factors of its own `rope_init_fn`s (YaRN with
and without truncation, named betas and DeepSeek's mscales; LongRoPE's short and long); another tool's Qwen2 with
YaRN and Qwen3 with YaRN, other betas, no truncation and a named attention factor convert at TP=2 with their logits;
a steerlm YaRN checkpoint exported at TP=2 is a LlamaForCausalLM whose `rope_scaling` is Qwen's three keys, with
steerlm's logits and HF `generate`'s greedy tokens, and converts back bitwise; both decoders decode it as the
recompute loop does (tests/test_generate.py, `yarn`); YaRN with LongRoPE or Llama-3.1's scaling, a NeMo export and a
run started from a YaRN checkpoint without it are refused naming the key.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError
from steerlm.config.convert import ModelFormat
from steerlm.models.hf_config import hf_model_fields
from steerlm.models.hf_llama import LLAMA, QWEN3, hf_architecture, hf_config_dict
from steerlm.models.rope import (
    long_rope_inverse_frequencies,
    rope_frequencies,
    yarn_attention_factor,
)
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import TEST_MODEL
from tests.hf_family_checks import (
    check_export,
    check_lean_greedy,
    check_same_logits,
    converted_other_tools,
    exported_at_tp2,
    imported,
)
from tests.test_convert import _convert
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402  (after the skip)

# YaRN x4 over a pretraining length of 32 positions (TEST_MODEL's 16-channel heads: 8 channel pairs)
YARN_MODEL = replace(
    TEST_MODEL, rope_yarn_factor=4.0, rope_original_max_positions=32, rope_attention_factor=yarn_attention_factor(4.0)
)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 8, "beta_slow": 2},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False},
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], "long_factor": [2.0] * 8},
    ],
)
def test_inverse_frequencies_and_attention_factors_are_transformers(scaling: dict) -> None:
    """The frequencies `steerlm.models.rope` computes for the `model.*` an import reads are the ones transformers'
    own functions compute from config.json, bitwise, and so is the attention factor."""
    family = "phi3" if scaling["rope_type"] == "longrope" else "llama"
    extra = {"original_max_position_embeddings": 32} if family == "phi3" else {}
    config_class = transformers.Phi3Config if family == "phi3" else transformers.LlamaConfig
    config = config_class(**HF_SHAPE, rope_scaling=dict(scaling), **extra)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=None)
    fields = hf_model_fields({**config.to_dict(), "model_type": family}, "input", "x")
    model = replace(TEST_MODEL, **{k: v for k, v in fields.items() if k.startswith("rope_") or k == "rotary_base"})
    model.validate()
    frequencies = rope_frequencies(model)
    assert frequencies is not None and torch.equal(frequencies[0], theirs)
    assert model.rope_attention_factor == their_factor
    if family == "phi3":  # the long factors: transformers' frequencies past the pretraining length
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=33)
        assert frequencies[1] is not None and torch.equal(frequencies[1], long)
        assert torch.equal(long, long_rope_inverse_frequencies(10000.0, 16, scaling["long_factor"]))
    else:
        assert frequencies[1] is None


@pytest.fixture(scope="module")
def yarn_imports(tmp_path_factory) -> dict:
    """transformers' Qwen2 and Qwen3 with YaRN (x4 over 32 positions), converted at TP=2."""
    torch.manual_seed(3)
    qwen2 = transformers.Qwen2Config(
        **HF_SHAPE, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    )
    yarn3 = {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 16.0,
        "truncate": False,
        "attention_factor": 1.2,
    }
    qwen3 = transformers.Qwen3Config(**HF_SHAPE, head_dim=32, rope_scaling=yarn3)
    models = {"qwen2": transformers.Qwen2ForCausalLM(qwen2), "qwen3": transformers.Qwen3ForCausalLM(qwen3)}
    return converted_other_tools(models, tmp_path_factory.mktemp("yarn_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_another_tool_s_yarn_qwen_converts_at_tp2_with_its_logits(layout, yarn_imports, name: str) -> None:
    source, _, run = yarn_imports[name]
    model, chunks = imported(layout, run)
    assert model.rope_original_max_positions == 32
    if name == "qwen3":
        assert (model.rope_yarn_factor, model.rope_yarn_beta_fast, model.rope_yarn_truncate) == (2.0, 16.0, False)
        assert model.rope_attention_factor == 1.2
    else:
        assert model.rope_attention_factor == pytest.approx(0.1 * math.log(4) + 1, rel=1e-15)
    check_same_logits(source, chunks, 80)
    assert hf_architecture(model).name == ("Qwen2" if name == "qwen2" else QWEN3.name)


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """YARN_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and converted back at TP=1."""
    return exported_at_tp2(layout, tmp_path_factory.mktemp("yarn_export"), YARN_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_a_yarn_checkpoint_exports_at_tp2_as_a_llama_with_qwens_keys_and_decodes_as_hf(layout, exported) -> None:
    hf = check_export(layout, exported, YARN_MODEL, TOKENS, "LlamaForCausalLM")
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    written = hf_config_dict(YARN_MODEL)["rope_scaling"]
    assert written == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert "YaRN x4 (pretraining length 32)" in (exported["hf"] / "README.md").read_text()
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


def test_what_yarn_cannot_be_combined_with_is_refused_naming_the_key() -> None:
    assert hf_architecture(YARN_MODEL) == LLAMA
    other = replace(YARN_MODEL, rope_attention_factor=1.5, rope_yarn_beta_slow=2.0, rope_yarn_truncate=False)
    written = hf_config_dict(other)["rope_scaling"]
    assert (written["attention_factor"], written["beta_slow"], written["truncate"]) == (1.5, 2.0, False)
    assert "beta_fast" not in written
    fields = hf_model_fields({**hf_config_dict(other), "rms_norm_eps": 1e-5}, "input", "x")
    assert all(fields[name] == getattr(other, name) for name in fields if name.startswith("rope_"))
    with pytest.raises(ConfigError, match="LongRoPE's factors .* are set too") as error:
        replace(YARN_MODEL, rope_short_factor=[1.0] * 8, rope_long_factor=[1.0] * 8).validate()
    assert error.value.key in ("model.rope_yarn_factor", "model.rope_short_factor")
    with pytest.raises(ConfigError, match="which YaRN replaces") as error:
        replace(YARN_MODEL, rope_scaling=True).validate()
    assert error.value.key == "model.rope_scaling"
    with pytest.raises(ValueError, match=r"Phi3 \(rope_yarn_factor must be null"):
        hf_architecture(replace(YARN_MODEL, rotary_percent=0.5))  # partial RoPE goes out as Phi-3, which has no YaRN


@pytest.mark.slow
def test_a_nemo_export_or_a_run_without_yarn_from_a_yarn_checkpoint_is_refused(layout, exported, tmp_path) -> None:
    with pytest.raises(ConfigError, match="YaRN's scaling.*no NeMo 1.x model") as error:
        convert(_convert(exported["run"], tmp_path / "nemo", to=ModelFormat.nemo), layout)
    assert error.value.key == "to"
    assert resolve_init_source("sft.init_from", str(exported["run"]), YARN_MODEL) is not None
    with pytest.raises(ConfigError, match="was written for model.rope_yarn_factor=4.0") as error:
        resolve_init_source("sft.init_from", str(exported["run"]), TEST_MODEL)
    assert error.value.key == "model.rope_yarn_factor"
