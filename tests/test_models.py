"""The megatron Llama model on one rank: it is Llama (equals HF transformers), its attention equals
megatron's own, initialisation is deterministic, and shard maps invert."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from steerlm.config import ModelConfig, PrecisionConfig
from steerlm.models import build_model_chunks
from steerlm.models.hf_llama import hf_config_dict, megatron_to_hf
from steerlm.models.sharding import named_global_parameters, shard, unshard
from tests.conftest import TEST_MODEL

TINY = TEST_MODEL


def _build(layout, model: ModelConfig = TINY, seed: int = 7):
    return build_model_chunks(model, PrecisionConfig(), layout, seed)[0]


def _tokens(rows: int = 2, length: int = 24, vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(3))
    return tokens, torch.arange(length).expand(rows, length)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"share_embeddings_and_output_weights": True},
        {"rope_scaling": True, "rope_scaling_factor": 32.0, "rotary_base": 500000},
        {"num_query_groups": None},
    ],
    ids=["gqa", "tied", "llama3_rope_scaling", "mha"],
)
def test_logits_equal_hf_llama_with_the_same_weights(layout, variant: dict) -> None:
    transformers = pytest.importorskip("transformers")
    model_cfg = replace(TINY, **variant)
    model = _build(layout, model_cfg)
    full = {name: param.detach() for name, param in named_global_parameters([model])}
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in hf_config_dict(model_cfg).items() if k not in ("architectures", "model_type")}
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(megatron_to_hf(full, model_cfg), strict=False)
    assert not unexpected and all("rotary" in name or name == "lm_head.weight" for name in missing)
    tokens, positions = _tokens(length=64)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., : model_cfg.vocab_size]
        theirs = hf(tokens).logits
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()


def test_initialisation_depends_only_on_the_seed(layout) -> None:
    first = dict(named_global_parameters([_build(layout, seed=7)]))
    again = dict(named_global_parameters([_build(layout, seed=7)]))
    other = dict(named_global_parameters([_build(layout, seed=8)]))
    assert all(torch.equal(first[name], again[name]) for name in first)
    matrices = [name for name, param in first.items() if param.dim() == 2]
    assert all(not torch.equal(first[name], other[name]) for name in matrices)


def test_initialisation_follows_megatron_distributions(layout) -> None:
    model_cfg = replace(TINY, hidden_size=256, ffn_hidden_size=1024, num_layers=8)
    params = dict(named_global_parameters([_build(layout, model_cfg)]))
    std = model_cfg.init_method_std
    assert params["decoder.layers.0.mlp.linear_fc1.weight"].std().item() == pytest.approx(std, rel=0.02)
    scaled = std / (2 * model_cfg.num_layers) ** 0.5
    assert params["decoder.layers.3.mlp.linear_fc2.weight"].std().item() == pytest.approx(scaled, rel=0.02)
    assert params["decoder.layers.0.self_attention.linear_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(params["decoder.final_layernorm.weight"], torch.ones(256))


@pytest.mark.parametrize("stride,tp", [(1, 2), (2, 2), (2, 4), (1, 4)])
def test_shard_and_unshard_invert(stride: int, tp: int) -> None:
    full = torch.arange(8 * tp * 3, dtype=torch.float32).reshape(8 * tp, 3)
    param = SimpleNamespace(tensor_model_parallel=True, partition_dim=0, partition_stride=stride)
    shards = [shard(full, param, rank, tp) for rank in range(tp)]
    assert all(s.shape == (8, 3) for s in shards)
    assert torch.equal(unshard(shards, param), full)
    if stride == 2:  # SwiGLU fc1: each rank holds [its gate rows; its up rows]
        gate, up = full.chunk(2)
        assert torch.equal(shards[0], torch.cat([gate.chunk(tp)[0], up.chunk(tp)[0]]))


def test_cpu_layer_redirects_cuda_devices(layout) -> None:
    """Megatron's hard-coded CUDA tensors land on the CPU once the runtime has started without CUDA."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU compatibility layer is not active")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"


@pytest.mark.parametrize("change", [{"activation": "gelu"}, {"add_bias_linear": True}, {"normalization": "LayerNorm"}])
def test_hf_mapping_refuses_non_llama_shapes(change: dict) -> None:
    from steerlm.config import Activation, Normalization

    values = {
        "activation": Activation(change.get("activation", "swiglu")),
        "normalization": Normalization(change.get("normalization", "RMSNorm")),
        "add_bias_linear": change.get("add_bias_linear", False),
    }
    with pytest.raises(ValueError, match="is not an HF Llama"):
        hf_config_dict(replace(TINY, **values))
