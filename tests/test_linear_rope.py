"""Linear RoPE scaling (position interpolation): `model.rope_linear_factor`, transformers' `rope_type: linear`
(DeepSeek-Coder, LongChat, Llama-2-7B-32K) and NeMo's `seq_len_interpolation_factor`.

Checked against transformers: the inverse frequencies of its own `rope_init_fn` (bitwise; RoPE on every channel and on
half of each head); another tool's Llama and Nemotron with linear scaling convert at TP=2 with their logits; a steerlm
checkpoint with it exports at TP=2 as a LlamaForCausalLM whose `rope_scaling` is DeepSeek-Coder's, with steerlm's
logits and HF `generate`'s greedy tokens, and converts back bitwise. Against NeMo's semantics: megatron's own
`seq_len_interpolation_factor` (which divides the positions) gives the same logits to rounding; a NeMo archive with
the key imports at TP=2 with its source's logits, and an export writes the key back. Both decoders decode it as the
recompute loop does (tests/test_generate.py, `linear`). Linear scaling with another scaling, an attention factor, a
Phi-3 export and a run started from such a checkpoint without it are refused naming the key.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.errors import DataError
from steerlm.models import build_model_chunks
from steerlm.models.hf_config import check_hf_config, hf_model_fields
from steerlm.models.hf_llama import LLAMA, hf_architecture, hf_config_dict
from steerlm.models.nemo_config import nemo_model
from steerlm.models.rope import rope_frequencies
from steerlm.stages.convert import convert
from steerlm.stages.nemo_import import import_nemo
from steerlm.training.init_from import resolve_init_source
from tests.conftest import TEST_MODEL, as_nemotron
from tests.hf_family_checks import (
    check_export,
    check_lean_greedy,
    check_same_logits,
    converted_other_tools,
    exported_at_tp2,
    imported,
)
from tests.nemo_archives import ROWS, VOCAB, nemo_config, nemo_tensors, to_tar, write_distributed
from tests.nemo_archives import llama as nemo_source_llama
from tests.test_nemo_export import _config
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402  (after the skip)

LINEAR_MODEL = replace(TEST_MODEL, rope_linear_factor=4.0)
LINEAR = {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_inverse_frequencies_are_transformers(family: str) -> None:
    """The frequencies `steerlm.models.rope` computes for the `model.*` an import reads are the ones transformers'
    own function computes from config.json, bitwise (on half of each head for the Nemotron), attention factor 1."""
    if family == "llama":
        config = transformers.LlamaConfig(**HF_SHAPE, rope_scaling=dict(LINEAR))
    else:
        config = transformers.NemotronConfig(**HF_SHAPE, partial_rotary_factor=0.5, rope_scaling=dict(LINEAR))
    theirs, their_factor = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    fields = hf_model_fields({**config.to_dict(), "model_type": family}, "input", "x")
    kept = ("rotary_base", "rotary_percent")
    model = replace(TEST_MODEL, **{k: v for k, v in fields.items() if k.startswith("rope_") or k in kept})
    model.validate()
    assert model.rope_linear_factor == 4.0 and model.rotary_percent == (1.0 if family == "llama" else 0.5)
    frequencies = rope_frequencies(model)
    assert frequencies is not None and frequencies[1] is None and torch.equal(frequencies[0], theirs)
    assert model.rope_attention_factor == their_factor == 1.0


def test_megatrons_position_interpolation_computes_the_same_function(layout) -> None:
    """NeMo trains with megatron's `seq_len_interpolation_factor` (positions divided by the factor); steerlm divides
    the frequencies as transformers does: the same logits up to rounding, and not plain RoPE's."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    ours = build_model_chunks(LINEAR_MODEL, PrecisionConfig(), layout, 5)[0]
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 5)[0]
    megatrons = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 5)[0]
    megatrons.rotary_pos_emb = RotaryEmbedding(
        kv_channels=TEST_MODEL.head_dim, rotary_percent=1.0, seq_len_interpolation_factor=4.0
    )
    tokens = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(1))

    def logits(chunk) -> torch.Tensor:
        with torch.no_grad():
            return chunk(tokens, torch.arange(100).expand_as(tokens), None)

    torch.testing.assert_close(logits(ours), logits(megatrons), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(ours), logits(plain), atol=1e-3)


@pytest.fixture(scope="module")
def linear_imports(tmp_path_factory) -> dict:
    """transformers' Llama (x4, DeepSeek-Coder's `type` key) and Nemotron (x2, RoPE on half of each head) with
    linear scaling, converted at TP=2."""
    torch.manual_seed(3)
    llama = transformers.LlamaConfig(**HF_SHAPE, rope_scaling={"type": "linear", "factor": 4.0})
    nemotron = transformers.NemotronConfig(
        **{k: v for k, v in HF_SHAPE.items() if k != "rms_norm_eps"},
        partial_rotary_factor=0.5,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    models = {
        "llama": transformers.LlamaForCausalLM(llama),
        "nemotron": transformers.NemotronForCausalLM(nemotron),
    }
    return converted_other_tools(models, tmp_path_factory.mktemp("linear_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name,factor", [("llama", 4.0), ("nemotron", 2.0)])
def test_another_tool_s_linear_scaling_converts_at_tp2_with_its_logits(
    layout, linear_imports, name: str, factor: float
) -> None:
    source, _, run = linear_imports[name]
    model, chunks = imported(layout, run)
    assert model.rope_linear_factor == factor and hf_architecture(model).model_type == name
    check_same_logits(source, chunks, 80)


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """LINEAR_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and converted back at TP=1."""
    return exported_at_tp2(layout, tmp_path_factory.mktemp("linear_export"), LINEAR_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_a_linear_checkpoint_exports_at_tp2_as_deepseek_coders_llama_and_decodes_as_hf(layout, exported) -> None:
    hf = check_export(layout, exported, LINEAR_MODEL, TOKENS, "LlamaForCausalLM")
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 4.0
    assert hf_config_dict(LINEAR_MODEL)["rope_scaling"] == {"type": "linear", "factor": 4.0}
    assert "linear RoPE scaling x4" in (exported["hf"] / "README.md").read_text()
    check_lean_greedy(layout, exported["run"], exported["hf"], TOKENS)


@pytest.mark.slow
def test_a_nemo_archive_with_position_interpolation_imports_and_exports(layout, tmp_path: Path) -> None:
    """A NeMo archive of transformers' linearly scaled Llama with `seq_len_interpolation_factor: 4.0`, written at
    TP=2, imports with its source's logits; the import's `.nemo` export writes the key and imports back bitwise."""
    source = nemo_source_llama(rope_scaling=dict(LINEAR))
    config = nemo_config(seq_len_interpolation_factor=4.0)
    archive = to_tar(write_distributed(tmp_path / "src", nemo_tensors(source, True, False), config))
    import_nemo(archive, tmp_path / "lm", layout)
    model, chunks = imported(layout, tmp_path / "lm")
    assert model.rope_linear_factor == 4.0
    check_same_logits(source, chunks, 100, vocab=VOCAB, seed=5)

    cfg = ConvertConfig(input=str(tmp_path / "lm"), output=str(tmp_path / "lm.nemo"), to=ModelFormat.nemo)
    cfg.validate()
    convert(cfg, layout)
    assert _config(tmp_path / "lm.nemo")["seq_len_interpolation_factor"] == 4.0
    import_nemo(tmp_path / "lm.nemo", tmp_path / "back", layout)
    back, back_chunks = imported(layout, tmp_path / "back")
    assert back.rope_linear_factor == 4.0
    tokens = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, again = (c[0](tokens, torch.arange(100).expand_as(tokens), None) for c in (chunks, back_chunks))
    assert torch.equal(again, ours)


def test_nemo_keys_read_and_refused() -> None:
    assert nemo_model(nemo_config(), "x.nemo/model_config.yaml", ROWS).model.rope_linear_factor is None
    read = nemo_model(nemo_config(seq_len_interpolation_factor=2), "x.nemo/model_config.yaml", ROWS).model
    assert read.rope_linear_factor == 2.0
    both = nemo_config(seq_len_interpolation_factor=2, scale_positional_embedding=True)
    with pytest.raises(DataError, match="model.rope_scaling.*which linear scaling replaces"):
        nemo_model(both, "x.nemo/model_config.yaml", ROWS)


def test_what_linear_scaling_cannot_be_combined_with_is_refused_naming_the_key() -> None:
    assert hf_architecture(LINEAR_MODEL) == LLAMA
    assert hf_architecture(as_nemotron(LINEAR_MODEL)).model_type == "nemotron"
    pairs = TEST_MODEL.head_dim // 2
    for other, key in (
        ({"rope_yarn_factor": 2.0}, "model.rope_linear_factor"),
        ({"rope_short_factor": [1.0] * pairs, "rope_long_factor": [1.0] * pairs}, "model.rope_linear_factor"),
        ({"rope_scaling": True}, "model.rope_scaling"),
        ({"rope_attention_factor": 1.2}, "model.rope_attention_factor"),
        ({"rope_linear_factor": 0.0}, "model.rope_linear_factor"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(LINEAR_MODEL, **other).validate()
        assert error.value.key == key, (other, str(error.value))
    with pytest.raises(ValueError, match=r"Phi3 \(rope_linear_factor must be null"):
        hf_architecture(replace(LINEAR_MODEL, rotary_percent=0.5))  # partial RoPE with SwiGLU goes out as Phi-3
    with pytest.raises(ConfigError, match="holds a model steerlm cannot express.*rope scaling"):
        dynamic = {"rope_type": "dynamic", "factor": 2.0}  # NTK-aware scaling: not steerlm's
        hf_model_fields({**hf_config_dict(TEST_MODEL), "rope_scaling": dynamic}, "input", "x")


def test_an_hf_directory_without_a_scaling_refuses_a_run_with_one() -> None:
    """`init_from` an HF directory: config.json without a scaling is a model without one; a run with linear scaling,
    YaRN or LongRoPE would compute another function from its weights."""
    plain, pairs = hf_config_dict(TEST_MODEL), TEST_MODEL.head_dim // 2
    for changes, name in (
        ({"rope_linear_factor": 2.0}, "rope_linear_factor"),
        ({"rope_yarn_factor": 4.0, "rope_original_max_positions": 32}, "rope_yarn_factor"),
        ({"rope_short_factor": [1.0] * pairs, "rope_long_factor": [2.0] * pairs}, "rope_short_factor"),
    ):
        with pytest.raises(ConfigError) as error:
            check_hf_config(plain, replace(TEST_MODEL, **changes), "sft.init_from", "/models/x")
        assert error.value.key == f"model.{name}" and f"set model.{name}=null" in str(error.value)
    check_hf_config(plain, TEST_MODEL, "sft.init_from", "/models/x")


@pytest.mark.slow
def test_a_run_without_linear_scaling_from_such_a_checkpoint_is_refused(exported) -> None:
    assert resolve_init_source("sft.init_from", str(exported["run"]), LINEAR_MODEL) is not None
    assert resolve_init_source("sft.init_from", str(exported["hf"]), LINEAR_MODEL) is not None
    for source in ("run", "hf"):
        with pytest.raises(ConfigError) as error:
            resolve_init_source("sft.init_from", str(exported[source]), TEST_MODEL)
        assert error.value.key == "model.rope_linear_factor", str(error.value)
