"""Hugging Face Llama import: megatron → HF (`save_pretrained`) → steerlm gives the same logits at TP=1 and
TP=2, `hf_to_megatron` inverts `megatron_to_hf`, and a config.json that does not match `model.*` is refused
naming the field and the value to set."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm import runtime
from steerlm.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from steerlm.models import build_model_chunks
from steerlm.models.hf_config import check_hf_config
from steerlm.models.hf_llama import SafetensorsWeights, hf_config_dict, hf_to_megatron, megatron_to_hf, read_hf_config
from steerlm.models.sharding import TIED_EMBEDDING, load_full_parameters, named_global_parameters
from steerlm.training.init_from import resolve_init_source
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed

transformers = pytest.importorskip("transformers")
VARIANTS = {
    "gqa": {},
    "tied": {"share_embeddings_and_output_weights": True},
    "llama3_rope_scaling": {"rope_scaling": True, "rope_scaling_factor": 32.0, "rotary_base": 500000},
}


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    return tokens, torch.arange(40).expand(2, 40)


def save_as_hf(chunks: list, model: ModelConfig, directory: Path) -> None:
    """What a user's HF checkpoint looks like: the model exported through transformers' own save_pretrained."""
    full = {name: param.detach() for name, param in named_global_parameters(chunks)}
    config = transformers.LlamaConfig(
        **{k: v for k, v in hf_config_dict(model).items() if k not in ("architectures", "model_type")}
    )
    hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(megatron_to_hf(full, model), strict=False)
    hf.save_pretrained(directory)


def _import(directory: Path, model: ModelConfig, layout, seed: int = 99) -> list:
    chunks = build_model_chunks(model, PrecisionConfig(), layout, seed)
    names = [name for name, _ in named_global_parameters(chunks)]
    load_full_parameters(chunks, hf_to_megatron(SafetensorsWeights(directory), model, names), layout.tp_rank, layout.tp)
    return chunks


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_round_trip_through_save_pretrained_gives_identical_logits(layout, tmp_path: Path, variant: dict) -> None:
    model = replace(TEST_MODEL, **variant)
    source = build_model_chunks(model, PrecisionConfig(), layout, 7)
    save_as_hf(source, model, tmp_path)
    check_hf_config(read_hf_config(tmp_path), model, "sft.init_from", str(tmp_path))
    imported = _import(tmp_path, model, layout)
    tokens, positions = _tokens()
    with torch.no_grad():
        expected = source[0](tokens, positions, None)[..., : model.vocab_size]
        logits = imported[0](tokens, positions, None)
        hf_logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(tokens).logits
    assert torch.equal(logits[..., : model.vocab_size], expected)
    torch.testing.assert_close(logits[..., : model.vocab_size], hf_logits, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(logits[..., model.vocab_size :]) == 0  # zero padding rows give logit 0


def test_hf_to_megatron_inverts_megatron_to_hf(layout) -> None:
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 3)
    full = {name: param.detach() for name, param in named_global_parameters(chunks)}
    back = hf_to_megatron(megatron_to_hf(full, TEST_MODEL), TEST_MODEL)
    assert set(back) == set(full)
    vocab = TEST_MODEL.vocab_size
    for name, tensor in full.items():
        if name in (TIED_EMBEDDING, "output_layer.weight"):
            assert torch.equal(back[name][:vocab], tensor[:vocab]) and not back[name][vocab:].any()
        else:
            assert torch.equal(back[name], tensor), name


def _hf_dir(tmp_path: Path, layout, **changes) -> Path:
    directory = tmp_path / "hf"
    save_as_hf(build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 7), TEST_MODEL, directory)
    config = read_hf_config(directory)
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


@pytest.mark.parametrize(
    "change,key,fix",
    [
        ({"hidden_size": 96}, "model.hidden_size", "set model.hidden_size=96"),
        ({"num_key_value_heads": 4}, "model.num_query_groups", "set model.num_query_groups=4"),
        (
            {"tie_word_embeddings": True},
            "model.share_embeddings_and_output_weights",
            "set model.share_embeddings_and_output_weights=True",
        ),
        (
            {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
            "model.rotary_base",
            "set model.rotary_base=500000",
        ),
        ({"hidden_act": "gelu"}, "apm.init_from", "convert a Llama (RMSNorm, SwiGLU"),
    ],
)
def test_config_json_that_differs_from_the_model_is_refused(
    layout, tmp_path: Path, change: dict, key: str, fix: str
) -> None:
    directory = _hf_dir(tmp_path, layout, **change)
    with pytest.raises(ConfigError) as error:
        resolve_init_source("apm.init_from", str(directory), TEST_MODEL)
    assert error.value.key == key and fix in str(error.value), str(error.value)
    if key.startswith("model."):
        assert f"apm.init_from={directory} holds an HF Llama" in str(error.value)


def _tp2_logits(directory: str, model: ModelConfig) -> torch.Tensor:
    layout = runtime.initialize(ParallelConfig(tensor_model_parallel_size=2), seed=0)
    chunks = _import(Path(directory), model, layout)
    tokens, positions = _tokens()
    with torch.no_grad():
        logits = chunks[0](tokens, positions, None)
    parts = [torch.empty_like(logits) for _ in range(layout.tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=layout.pg_collection.tp)
    runtime.shutdown()
    return torch.cat(parts, dim=-1)


@pytest.mark.slow
def test_tp2_import_gives_the_one_rank_logits(layout, tmp_path: Path) -> None:
    source = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 7)
    save_as_hf(source, TEST_MODEL, tmp_path)
    tokens, positions = _tokens()
    vocab = TEST_MODEL.vocab_size
    with torch.no_grad():
        expected = source[0](tokens, positions, None)[..., :vocab]
    for logits in run_distributed(_tp2_logits, 2, str(tmp_path), TEST_MODEL):
        torch.testing.assert_close(logits[..., :vocab], expected, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(logits[..., vocab:]) == 0
