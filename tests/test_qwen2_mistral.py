"""Qwen2- and Mistral-shaped models. Qwen2 is a Llama with biases on the query, key and value projections alone
(`model.add_qkv_bias`: megatron's `add_qkv_bias`, NeMo's `qkv_bias`); Mistral computes what a Llama does, its layers
attending to the last `sliding_window` positions (Mistral-7B-v0.1's 4,096) or, from v0.2 on, to every position.

Checked against transformers' Qwen2 and Mistral: a Qwen2-shaped checkpoint with random biases, exported at TP=2, loads
as Qwen2ForCausalLM with steerlm's logits and imports back bitwise; the lean decoder's greedy tokens equal HF
`generate`'s; a regression APM exports as Qwen2ForSequenceClassification with steerlm's scores. Another tool's Qwen2
(tied embeddings, as the small Qwen2.5 models have) and Mistral, written by transformers' `save_pretrained`, convert
to steerlm at TP=2 with their logits. A Mistral's sliding window becomes the imported model's positions and
`init_from` refuses a run with more; the q/k/v biases are checked by `init_from`; checkpoints written before the field
existed read as no biases; a `.nemo` export writes `qkv_bias` (the archives themselves: tests/test_nemo_import.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.checkpoint.sharded import META, check_compatible, load_weights, resolve_checkpoint, saved_config
from steerlm.config import ConfigError, ModelConfig, PrecisionConfig
from steerlm.config.store import to_typed
from steerlm.inference.decoders import lean_unsupported
from steerlm.inference.generate import Generator, SamplingParams
from steerlm.inference.loading import load_generator
from steerlm.models import build_model_chunks
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.hf_llama import LLAMA, QWEN2, hf_architecture, hf_config_dict
from steerlm.models.nemo_config import nemo_model, nemo_model_config
from steerlm.stages.convert import convert
from steerlm.training.init_from import resolve_init_source
from tests.conftest import QWEN2_MODEL, TEST_MODEL, randomize_biases
from tests.multiproc import run_distributed
from tests.test_convert import _checkpoint, _convert, _distributed_conversions, _parameters, _steerlm_logits

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


def _random_biases(layout):
    return lambda chunks: randomize_biases(chunks, layout)


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """A Qwen2-shaped SFT checkpoint (random q/k/v biases), exported at TP=2 and imported back at TP=1."""
    root = tmp_path_factory.mktemp("qwen2")
    run = _checkpoint(layout, root / "sft", QWEN2_MODEL, prepare=_random_biases(layout))
    run_distributed(_distributed_conversions, 2, [(str(run), str(root / "hf"), {}, 2, 1)])
    convert(_convert(root / "hf", root / "back"), layout)
    return {"run": run, "hf": root / "hf", "back": root / "back"}


@pytest.mark.slow
def test_an_export_at_tp2_is_an_hf_qwen2_with_steerlm_logits_and_imports_back_bitwise(layout, exported) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert set(hf.config.layer_types) == {"full_attention"} and hf.config.rope_parameters["rope_theta"] == 1e6
    assert hf.model.layers[1].self_attn.k_proj.bias.abs().min() > 0  # the random biases came along
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    ours = _steerlm_logits(layout, exported["run"], QWEN2_MODEL, TOKENS)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    original, back = (_parameters(layout, exported[k], QWEN2_MODEL) for k in ("run", "back"))
    assert original.keys() == back.keys() and all(torch.equal(original[n], back[n]) for n in original)
    assert "decoder.layers.1.self_attention.linear_qkv.bias" in back


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_equal_hf_qwen2_generate(layout, exported) -> None:
    loaded = load_generator(str(exported["run"]), layout, PrecisionConfig())
    assert lean_unsupported(loaded.generator.model) is None
    # neither side stops early: every one of the 8 tokens is compared
    lean = Generator([loaded.generator.model], loaded.tokenizer, layout, 128, stop_token_ids=[], decoder="lean")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    hf.generation_config.eos_token_id = None
    prompts = [TOKENS[0, :9].tolist(), TOKENS[1, :4].tolist()]
    ours = lean.generate(prompts, [SamplingParams(max_new_tokens=8)] * 2)
    beyond = list(range(loaded.tokenizer.vocab_size, hf.config.vocab_size))  # rows steerlm never samples
    for prompt, result in zip(prompts, ours):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, suppress_tokens=beyond)
        assert result.token_ids == expected[0, len(prompt) :].tolist()


def test_a_regression_apm_exports_as_qwen2_sequence_classification(layout, tmp_path: Path) -> None:
    def prepare(chunks: list) -> None:
        randomize_biases(chunks, layout)
        torch.nn.init.normal_(chunks[0].attribute_head.bias)

    run = _checkpoint(layout, tmp_path / "apm", QWEN2_MODEL, apm=True, prepare=prepare)
    convert(_convert(run, tmp_path / "hf"), layout)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 3
    chunks = build_attribute_model_chunks(QWEN2_MODEL, PrecisionConfig(), layout, 1, 3)
    load_weights(resolve_checkpoint(run), chunks, layout, QWEN2_MODEL)
    with torch.no_grad():
        theirs = hf(TOKENS).logits + torch.tensor(hf.config.steerlm_score_bias)
        ours = chunks[0](TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)[:, -1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def _other_tools(root: Path) -> dict[str, tuple[torch.nn.Module, Path]]:
    """transformers' own models, every weight random (q/k/v biases around 0.5), written by `save_pretrained`: a
    Qwen2 with tied embeddings, a Mistral attending to every position, and one whose layers see 64 positions."""
    torch.manual_seed(0)
    models = {
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**HF_SHAPE, tie_word_embeddings=True, rope_theta=1e6)
        ),
        "mistral": transformers.MistralForCausalLM(transformers.MistralConfig(**HF_SHAPE, sliding_window=None)),
        "mistral_window": transformers.MistralForCausalLM(transformers.MistralConfig(**HF_SHAPE, sliding_window=64)),
    }
    out = {}
    with torch.no_grad():
        for name, model in models.items():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.1 + (0.5 if param.dim() == 1 else 0.0))
            model.eval().save_pretrained(root / name)
            out[name] = (model, root / name)
    return out


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """Each of `_other_tools` and the steerlm checkpoint it converts to at TP=2 (one two-rank launch)."""
    root = tmp_path_factory.mktemp("other_tools")
    sources = _other_tools(root)
    jobs = [(str(directory), str(root / f"{name}_steerlm"), {}, 2, 1) for name, (_, directory) in sources.items()]
    run_distributed(_distributed_conversions, 2, jobs)
    return {name: (model, directory, root / f"{name}_steerlm") for name, (model, directory) in sources.items()}


def _imported(layout, run: Path) -> tuple[ModelConfig, list]:
    path = resolve_checkpoint(run)
    model = to_typed(saved_config(path).model, ModelConfig)
    chunks = build_model_chunks(model, PrecisionConfig(), layout, 99)
    load_weights(path, chunks, layout, model)
    return model, chunks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "mistral", "mistral_window"])
def test_another_tool_s_qwen2_and_mistral_convert_at_tp2_with_their_logits(layout, other_tools, name: str) -> None:
    source, _, run = other_tools[name]
    model, chunks = _imported(layout, run)
    assert model.add_qkv_bias is (name == "qwen2") and not model.add_bias_linear
    assert model.share_embeddings_and_output_weights is (name == "qwen2")
    assert model.max_position_embeddings == (64 if name == "mistral_window" else 128)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(6))  # the window's length
    with torch.no_grad():
        theirs = source(tokens).logits
        ours = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :300]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert hf_architecture(model) == (QWEN2 if name == "qwen2" else LLAMA)  # a Mistral goes out as the Llama it is
    if name == "mistral_window":  # past the window the two differ: why the import keeps 64 positions
        longer = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            theirs = source(longer).logits
            ours = chunks[0](longer, torch.arange(96)[None], None)[..., :300]
        torch.testing.assert_close(theirs[:, :64], ours[:, :64], rtol=0, atol=1e-4)
        assert (theirs[:, 64:] - ours[:, 64:]).abs().amax() > 1e-2


@pytest.mark.slow
def test_init_from_checks_the_q_k_v_biases_and_a_sliding_window(other_tools) -> None:
    qwen2, mistral = other_tools["qwen2"][1], other_tools["mistral_window"][1]
    tied = replace(TEST_MODEL, share_embeddings_and_output_weights=True, rotary_base=1000000, layernorm_epsilon=1e-6)
    assert resolve_init_source("sft.init_from", str(qwen2), replace(tied, add_qkv_bias=True)) is not None
    with pytest.raises(ConfigError, match="holds an HF Qwen2 with add_qkv_bias=True") as error:
        resolve_init_source("sft.init_from", str(qwen2), tied)
    assert error.value.key == "model.add_qkv_bias"
    window = replace(TEST_MODEL, layernorm_epsilon=1e-6, max_position_embeddings=64)
    assert resolve_init_source("apm.init_from", str(mistral), window) is not None
    with pytest.raises(ConfigError, match="attend to the last 64 positions alone") as error:
        resolve_init_source("apm.init_from", str(mistral), replace(window, max_position_embeddings=128))
    assert error.value.key == "model.max_position_embeddings" and "max_position_embeddings=64" in str(error.value)


def test_hf_architecture_is_told_by_the_q_k_v_biases(layout) -> None:
    assert hf_architecture(QWEN2_MODEL) == QWEN2
    config = hf_config_dict(QWEN2_MODEL)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert not config["use_sliding_window"] and "attention_bias" not in config
    with pytest.raises(ValueError, match="not an HF Llama .* nor an HF Nemotron .* nor an HF Qwen2") as error:
        hf_architecture(replace(QWEN2_MODEL, add_bias_linear=True))  # biases on every linear layer: none
    assert "add_bias_linear must be false" in str(error.value)


def test_a_checkpoint_written_before_the_field_existed_reads_as_no_q_k_v_biases(layout, tmp_path: Path) -> None:
    step = resolve_checkpoint(_checkpoint(layout, tmp_path / "old", TEST_MODEL))
    meta = json.loads((step / META).read_text())
    del meta["model"]["add_qkv_bias"]
    (step / META).write_text(json.dumps(meta))
    check_compatible(step, TEST_MODEL)
    with pytest.raises(ConfigError, match="written for model.add_qkv_bias=False") as error:
        check_compatible(step, QWEN2_MODEL)
    assert error.value.key == "model.add_qkv_bias"


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
