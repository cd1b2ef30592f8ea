"""The decoders: rows that join a running batch at different steps get the logits they get alone (every
decoder); the lean decoders beyond megatron's local layers (Transformer Engine's layout of the input norms,
fused into `linear_qkv` / `linear_fc1`); and the static-shape decode step that CUDA graphs record."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp

from steerlm import runtime
from steerlm.config import ModelConfig, Normalization, PrecisionConfig
from steerlm.inference.decoders import GraphedLeanDecoder, LeanDecoder, MegatronDecoder, lean_unsupported
from steerlm.models.gpt import build_model_chunks
from tests.conftest import NEMOTRON_MODEL, TEST_MODEL
from tests.memory_meter import PeakMeter

TOKENS = torch.tensor([[2, 20, 21, 22, 23, 24, 25, 26, 27, 28], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


def _chunk(layout, model=TEST_MODEL) -> torch.nn.Module:
    """The model with its norm weights moved away from their initial ones, so a skipped norm would show."""
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=3)[0].eval()
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return chunk


def _fuse_norms_like_transformer_engine(fused: torch.nn.Module) -> torch.nn.Module:
    """Lay the model out as megatron's TE spec lays a layer out: `input_layernorm` / `pre_mlp_layernorm` are
    IdentityOp and their parameters sit on the following linear as `layer_norm_weight` / `layer_norm_bias`."""
    for layer in fused.decoder.layers:
        for norm_name, linear in (
            ("input_layernorm", layer.self_attention.linear_qkv),
            ("pre_mlp_layernorm", layer.mlp.linear_fc1),
        ):
            norm = getattr(layer, norm_name)
            linear.layer_norm_weight = norm.weight
            if norm.bias is not None:
                linear.layer_norm_bias = norm.bias
            setattr(layer, norm_name, IdentityOp())
    return fused


def _steps(decoder, tokens: torch.Tensor, prefill: int, keep_at: int | None = None) -> list[torch.Tensor]:
    """Logits of a prefill and then one position at a time; rows [1] only from `keep_at` on."""
    with runtime.inference():
        out = [decoder.add(tokens[:, :prefill].tolist(), tokens.shape[1])[0]]
        for position in range(prefill, tokens.shape[1]):
            if position == keep_at:
                decoder.keep([1])
                tokens = tokens[1:]
            out.append(decoder.step(tokens[:, position]))
    return out


@pytest.mark.parametrize(
    "model",
    [TEST_MODEL, replace(TEST_MODEL, normalization=Normalization.LayerNorm), NEMOTRON_MODEL],
    ids=["rmsnorm", "layernorm", "nemotron"],
)
def test_lean_decoder_applies_norms_fused_into_the_linears(layout, model: ModelConfig) -> None:
    """Also Nemotron's layers (zero-centred LayerNorm weights, squared ReLU, RoPE on half of each head)."""
    chunk, fused = _chunk(layout, model), _fuse_norms_like_transformer_engine(_chunk(layout, model))
    assert lean_unsupported(fused) is None
    ours = _steps(LeanDecoder(fused, layout, 16), TOKENS, 4)
    reference = _steps(MegatronDecoder(chunk, layout, 16), TOKENS, 4)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_layer_with_no_input_norm_the_lean_loop_can_find_is_left_to_megatron(layout) -> None:
    stripped = _chunk(layout)
    stripped.decoder.layers[1].input_layernorm = IdentityOp()
    assert "input norms" in lean_unsupported(stripped)
    doubled = _chunk(layout)
    own_norm = doubled.decoder.layers[0].pre_mlp_layernorm
    _fuse_norms_like_transformer_engine(doubled).decoder.layers[0].pre_mlp_layernorm = own_norm
    assert "input norms" in lean_unsupported(doubled)


@pytest.mark.parametrize("keep_at", [None, 7], ids=["all_rows", "a_row_dropped"])
def test_static_decode_step_equals_the_eager_lean_loop(layout, keep_at: int | None) -> None:
    """What the CUDA graph records (one position as a device tensor, the whole zeroed cache under a mask)
    gives the eager loop's logits, also after a finished row leaves the batch."""
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=5)[0].eval()
    static = _steps(GraphedLeanDecoder(chunk, layout, 16, capture=False), TOKENS, 3, keep_at)
    eager = _steps(LeanDecoder(chunk, layout, 16), TOKENS, 3, keep_at)
    assert [t.shape[0] for t in static] == [t.shape[0] for t in eager]
    for got, expected in zip(static, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_graph_decoding_is_refused_without_cuda(layout) -> None:
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=5)[0]
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedLeanDecoder(chunk, layout, 16)


def _alone(decoder, tokens: list[int], prefill: int) -> list[torch.Tensor]:
    with runtime.inference():
        out = [decoder.add([tokens[:prefill]], 16)[0][0]]
        out += [decoder.step(torch.tensor([token]))[0] for token in tokens[prefill:]]
    return out


@pytest.mark.parametrize("kind", ["lean", "megatron", "graphed"])
def test_rows_that_join_and_leave_at_different_steps_get_the_logits_they_get_alone(layout, kind: str) -> None:
    """Row a is prefilled with 4 tokens and steps alone twice; rows b (3 tokens) and c (5 tokens) join then,
    each at its own position; a leaves after 2 more steps and b and c go on: every row's logits at every
    position equal those of the row decoded alone."""
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=5)[0].eval()
    build = {
        "lean": lambda: LeanDecoder(chunk, layout, 16),
        "megatron": lambda: MegatronDecoder(chunk, layout, 16),
        "graphed": lambda: GraphedLeanDecoder(chunk, layout, 16, capture=False),
    }[kind]
    a, b, c = TOKENS[0].tolist(), TOKENS[1].tolist(), [5, 6, 7, 8, 9, 10, 11, 12]
    expected = {"a": _alone(build(), a[:8], 4), "b": _alone(build(), b[:8], 3), "c": _alone(build(), c, 5)}
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    decoder = build()
    with runtime.inference():
        got["a"].append(decoder.add([a[:4]], 16)[0][0])
        got["a"] += [decoder.step(torch.tensor([token]))[0] for token in a[4:6]]
        joined, _ = decoder.add([b[:3], c[:5]], 16)
        got["b"].append(joined[0])
        got["c"].append(joined[1])
        for step in range(2):
            logits = decoder.step(torch.tensor([a[6 + step], b[3 + step], c[5 + step]]))
            for name, row in zip("abc", logits):
                got[name].append(row)
        decoder.keep([1, 2])
        for step in range(3):
            logits = decoder.step(torch.tensor([b[5 + step], c[7 + step] if step == 0 else 0]))
            got["b"].append(logits[0])
            if step == 0:
                got["c"].append(logits[1])
    for name in "abc":
        assert len(got[name]) <= len(expected[name])
        for position, (ours, alone) in enumerate(zip(got[name], expected[name])):
            torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5, msg=f"row {name}, step {position}")


@pytest.mark.parametrize("kind", ["lean", "megatron", "graphed"])
def test_prompt_logits_of_a_prefill_equal_a_cache_free_forward_pass(layout, kind: str) -> None:
    """`add(..., scored)` hands out the asked rows' logits at every prompt position but the last, in spans of
    any size (here 3, ending inside a prompt), from the prefill that also starts them; rows joining a running
    batch (the second `add`) too; rows not asked get none."""
    chunk = _chunk(layout)
    decoder = {
        "lean": lambda: LeanDecoder(chunk, layout, 16),
        "megatron": lambda: MegatronDecoder(chunk, layout, 16),
        "graphed": lambda: GraphedLeanDecoder(chunk, layout, 16, capture=False),
    }[kind]()
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :4].tolist(), TOKENS[1, 2:10].tolist()]
    with runtime.inference():
        _, first = decoder.add(prompts[:2], 16, scored=[0])
        decoder.step(torch.tensor([5, 6]))
        _, joined = decoder.add(prompts[2:], 16, scored=[0])
        for prompt, logits in ((prompts[0], first[0]), (prompts[2], joined[0])):
            reference = chunk(torch.tensor([prompt]), torch.arange(len(prompt))[None], None)[0, :-1]
            torch.testing.assert_close(torch.cat(list(logits.chunks(3))), reference, rtol=1e-5, atol=1e-5)
    assert list(first) == [0] and list(joined) == [0]


def _cache_bytes(decoder: LeanDecoder) -> int:
    return sum(keys.nbytes + values.nbytes for keys, values in decoder.cache)


def test_rows_joining_and_leaving_copy_the_cache_one_layer_at_a_time(layout):
    """Rows leaving (`keep`) or joining (`add`) rebuild the KV cache layer by layer: beside the cache the decoder
    ends with, the peak holds one layer's copy (and the prefill's own transients), never a second whole cache —
    which a server whose cache fills the GPU could not hold."""
    model = replace(TEST_MODEL, num_layers=4, max_position_embeddings=256)
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=3)[0].eval()
    decoder = LeanDecoder(chunk, layout, 256)
    prompts = torch.randint(0, model.vocab_size, (6, 8), generator=torch.Generator().manual_seed(0)).tolist()
    with runtime.inference(), PeakMeter() as meter:
        decoder.add(prompts, 200)
        meter.reset_peak()
        before = meter.current
        decoder.keep([0, 2, 4])
        assert meter.peak - before == _cache_bytes(decoder) // model.num_layers  # one layer's kept rows
        meter.reset_peak()
        decoder.add([[5]], 200)  # a one-token prefill: its own transients are a few kilobytes
        layer = _cache_bytes(decoder) // model.num_layers
        assert decoder.cache[0][0].shape[0] == 4 and layer > 64 * 2**10
        assert meter.peak - meter.current <= layer + 16 * 2**10


@pytest.mark.parametrize("prefill_tokens", [1, 6, 20])
def test_a_chunked_prefill_gives_what_one_forward_gives(layout, prefill_tokens: int):
    """Prompts of three lengths prefilled `prefill_tokens // 3` positions at a time (at least one; the last chunk
    shorter, rows ending inside any chunk): the next-token logits, the prompt logits of a scored row and the
    logits of the steps after it are those of one forward over the whole prompts."""
    chunk = _chunk(layout)
    prompts = [TOKENS[0, :9].tolist(), TOKENS[1, :4].tolist(), TOKENS[0, 3:10].tolist()]

    def run(decoder: LeanDecoder) -> list[torch.Tensor]:
        with runtime.inference():
            logits, scored = decoder.add(prompts, 16, scored=[1])
            out = [logits, *scored[1].chunks(2)]
            for _ in range(3):
                logits = decoder.step(logits.argmax(-1))
                out.append(logits)
        return out

    whole = run(LeanDecoder(chunk, layout, 16))
    chunked = run(LeanDecoder(chunk, layout, 16, prefill_tokens=prefill_tokens))
    assert len(chunked) == len(whole)
    for got, expected in zip(chunked, whole):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_chunked_prefill_holds_a_chunk_s_transients(layout):
    """The memory a prefill needs beside the cache it fills grows with the tokens of one forward, not the
    prompts': 512 tokens of 4 rows in chunks of 64 tokens need ~1/8 of what one forward needs."""
    model = replace(TEST_MODEL, num_layers=2, max_position_embeddings=256)
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=3)[0].eval()
    prompts = torch.randint(0, model.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0)).tolist()
    peaks = {}
    for tokens in (512, 64):
        decoder = LeanDecoder(chunk, layout, 256, prefill_tokens=tokens)
        with runtime.inference(), PeakMeter() as meter:
            decoder.add(prompts, 128)
            peaks[tokens] = meter.peak - _cache_bytes(decoder)
    assert peaks[64] < peaks[512] / 6
