"""Items 13-15 of steerlm.megatron_compat, the layers megatron-core 0.16 lacks (RoPE scalings and Gemma 3's local
RoPE, Gemma's scaled input embeddings, Gemma 2's layers), checked against the installed megatron-core: a release that
changes what an item relies on fails here, naming the item. Items 1-12: tests/test_megatron_compat.py."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

from steerlm.config import PrecisionConfig
from steerlm.models import build_model_chunks
from tests.conftest import GEMMA2_MODEL, TEST_MODEL

# 13. RoPE scalings megatron lacks (LongRoPE, YaRN) and Gemma 3's local RoPE


def test_long_rope_replaces_megatrons_rotary_forward_and_scales_attentions_cos_sin(layout):
    """GPTModel calls `rotary_pos_emb(length, packed_seq=…, cp_group=…)` (the signature `ScaledRotaryEmbedding.forward`
    overrides) and self-attention multiplies cos/sin by the module-level concentration function item 13 rebinds."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import attention

    from steerlm.megatron_compat.scaled_rope import ATTENTION_FACTOR, ScaledRotaryEmbedding, attention_factor

    assert list(inspect.signature(RotaryEmbedding.forward).parameters) == [
        "self",
        "max_seq_len",
        "offset",
        "packed_seq",
        "cp_group",
    ]
    pairs = TEST_MODEL.head_dim // 2
    model = replace(
        TEST_MODEL, rope_short_factor=[1.0] * pairs, rope_long_factor=[4.0] * pairs, rope_original_max_positions=8
    )
    tokens = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 5)[0]
    short = build_model_chunks(model, PrecisionConfig(), layout, 5)[0]
    scaled = build_model_chunks(replace(model, rope_attention_factor=1.5), PrecisionConfig(), layout, 5)[0]
    assert isinstance(short.rotary_pos_emb, ScaledRotaryEmbedding)
    assert attention._yarn_get_concentration_factor_from_config(scaled.config) == 1.5
    assert getattr(scaled.config, ATTENTION_FACTOR) == attention_factor(scaled.config) == 1.5
    assert attention_factor(plain.config) == 1.0

    def logits(chunk, n: int) -> torch.Tensor:
        with torch.no_grad():
            return chunk(tokens[:, :n], torch.arange(n)[None], None)

    # factors of one within the pretraining length: megatron's own RoPE; past it (and with a factor) not
    torch.testing.assert_close(logits(short, 8), logits(plain, 8), rtol=0, atol=0)
    assert not torch.allclose(logits(short, 12), logits(plain, 12), atol=1e-3)
    assert not torch.allclose(logits(scaled, 8), logits(short, 8), atol=1e-3)


@pytest.mark.parametrize("recompute", ["none", "uniform"])
def test_local_rope_swaps_the_table_megatron_hands_each_sliding_layer(layout, recompute: str):
    """megatron's TransformerBlock hands every layer the forward's rotary table as the keyword `rotary_pos_emb` (in a
    recomputed chunk too, forward and backward), and `is_layer_window_attention` picks the layers whose hook swaps it:
    the sliding layer's attention rotates with the local embedding's table, the full one with the model's."""
    from steerlm.config.schema import Recompute
    from steerlm.megatron_compat.scaled_rope import local_rotary_embedding

    model = replace(
        TEST_MODEL, sliding_window=4, window_attn_skip_freq=2, rope_local_base_freq=100, recompute=Recompute(recompute)
    )
    chunk = build_model_chunks(model, PrecisionConfig(), layout, 5)[0]
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for layer in chunk.decoder.layers:
        layer.self_attention.register_forward_pre_hook(
            lambda module, args, kwargs, n=layer.layer_number: seen[n].append(kwargs["rotary_pos_emb"]),
            with_kwargs=True,
        )
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    chunk(tokens, torch.arange(12)[None], None).float().sum().backward()
    local, full = local_rotary_embedding(chunk), chunk.rotary_pos_emb
    assert local is not None and len(seen[1]) == len(seen[2]) == (2 if recompute == "uniform" else 1)
    assert all(torch.equal(table, local(12)) for table in seen[1])
    assert all(torch.equal(table, full(12)) for table in seen[2]) and not torch.equal(local(12), full(12))
    assert local_rotary_embedding(build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 5)[0]) is None


# 14. Scaled input embeddings (Gemma's)


def test_scaled_embeddings_multiply_the_embedding_output(layout):
    """A chunk built with `model.apply_embedding_scaling` computes what one without it computes from word embeddings
    multiplied by sqrt(hidden_size), bitwise: the hook multiplies what GPTModel's `embedding` returns."""
    from steerlm.megatron_compat.scaled_embedding import embedding_scale

    scaled_model = replace(TEST_MODEL, apply_embedding_scaling=True)
    scaled = build_model_chunks(scaled_model, PrecisionConfig(), layout, 5)[0]
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 5)[0]
    assert embedding_scale(scaled) == 8.0 and embedding_scale(plain) is None  # sqrt(64)
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None].expand_as(tokens)
    with torch.no_grad():
        ours = scaled(tokens, positions, None)
        assert not torch.allclose(ours, plain(tokens, positions, None), atol=1e-3)
        plain.embedding.word_embeddings.weight.mul_(torch.tensor(8.0))
        assert torch.equal(ours, plain(tokens, positions, None))


# 15. Gemma 2's layers


def test_gemma2_layers_rely_on_megatrons_sublayer_outputs_checkpoint_keys_and_core_attention_arguments(layout):
    """What `megatron_compat.gemma2` relies on: a layer's `self_attention` and `mlp` hand on `(output, bias)` and
    `output_layer` `(logits, bias)`; the layer's checkpoint holds the added norms under its global index; the core
    attention receives megatron's `softmax_scale` and a config carrying the cap."""
    from steerlm.megatron_compat.gemma2 import POST_NORMS, SoftcappedCoreAttention, attention_softcap

    chunk = build_model_chunks(GEMMA2_MODEL, PrecisionConfig(), layout, 5)[0]
    outputs: dict[str, object] = {}
    layer = chunk.decoder.layers[1]
    for name, module in (("attention", layer.self_attention), ("mlp", layer.mlp), ("logits", chunk.output_layer)):
        module.register_forward_hook(lambda m, i, output, name=name: outputs.__setitem__(name, output))
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        capped = chunk(tokens, torch.arange(12)[None].expand_as(tokens), None)
    for name in ("attention", "mlp", "logits"):
        value = outputs[name]
        assert isinstance(value, tuple) and len(value) == 2 and value[1] is None, name
    assert capped.abs().max() <= 0.1  # the final cap
    state = chunk.sharded_state_dict()  # a layer's tensors stacked over the layers, this one at offset 1
    for norm in POST_NORMS:
        tensor = state[f"decoder.layers.1.{norm}.weight"]
        assert (tensor.key, tensor.global_offset) == (f"decoder.layers.{norm}.weight", (1, 0))
    core = layer.self_attention.core_attention
    assert isinstance(core, SoftcappedCoreAttention) and core.softmax_scale == 24**-0.5
    assert attention_softcap(core.config) == 0.05
