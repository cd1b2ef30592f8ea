"""KV-cache generation: equals a full-recompute argmax loop, batches prompts of any lengths, samples as
configured, stops on tokens and strings, streams exactly the final text, and agrees between TP=1, TP=2, PP=2
and TP=2 x PP=2."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import replace

import pytest
import torch

from steerlm import runtime
from steerlm.config import Activation, ConfigError, ModelConfig, ParallelConfig, PositionEmbedding, PrecisionConfig
from steerlm.config.inference import PREFILL_TOKENS
from steerlm.inference import FinishReason, Generator, PromptTooLong, SamplingParams
from steerlm.inference.decoders import LeanDecoder, MegatronDecoder
from steerlm.inference.generate import Decoding, RowFailed, RowRequest, StepOutcome, sample
from steerlm.models.gpt import build_model_chunks
from steerlm.tokenizers import WordTokenizer
from tests.conftest import GEMMA2_MODEL, GEMMA3_MODEL, GEMMA_MODEL, TEST_MODEL, randomize_biases
from tests.multiproc import run_distributed

WORDS = (
    "the owl hunts at night and the fox sleeps by day while a small grey mouse runs under old green "
    "leaves near cold water where fish swim and birds sing softly in tall trees"
).split()
TOKENIZER = WordTokenizer.build([" ".join(WORDS) + " . , ! ?"])
PROMPTS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25, 26, 27], [2, 30], [2, 40, 41, 42, 43, 44]]


def _chunks(model: ModelConfig, layout: runtime.ParallelLayout) -> list:
    """The model's chunks, its biases (if any) random: steerlm's initialisation zeroes them."""
    chunks = build_model_chunks(model, PrecisionConfig(), layout, seed=7)
    randomize_biases(chunks, layout)
    return chunks


def _generator(
    layout: runtime.ParallelLayout,
    stop_ids=(),
    limit: int | None = None,
    decoder: str = "auto",
    model: ModelConfig = TEST_MODEL,
    prefill_tokens: int = PREFILL_TOKENS,
) -> Generator:
    chunks = _chunks(model, layout)
    limit = limit or model.max_position_embeddings
    return Generator(chunks, TOKENIZER, layout, limit, stop_ids, decoder, prefill_tokens=prefill_tokens)


def _argmax_loop(generator: Generator, prompt: list[int], steps: int) -> list[int]:
    """The reference: recompute the whole sequence without a cache for every new token."""
    tokens = list(prompt)
    with runtime.inference():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            logits = generator.model(ids, torch.arange(len(tokens))[None], None)
            tokens.append(int(logits[0, -1, : TOKENIZER.vocab_size].argmax()))
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def generator(layout) -> Generator:
    return _generator(layout)


# Both decoders on the shapes the lean one must reproduce: GQA, tied embeddings with MHA, Llama-3 RoPE scaling,
# Qwen2's query/key/value biases, Qwen3's QK norms over heads wider than hidden / heads, biases on every linear layer
# (random: `_chunks`), YaRN, linear scaling, Gemma's layers.
SHAPES = {
    "gqa": TEST_MODEL,
    "tied_mha": replace(TEST_MODEL, share_embeddings_and_output_weights=True, num_query_groups=None),
    "llama3_rope": replace(TEST_MODEL, rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000),
    "qkv_bias": replace(TEST_MODEL, add_qkv_bias=True),
    "qk_norm": replace(TEST_MODEL, qk_layernorm=True, kv_channels=32),
    "biased": replace(TEST_MODEL, add_bias_linear=True),
    # YaRN x4 over 8 positions with its attention factor (steerlm.megatron_compat.scaled_rope)
    "yarn": replace(TEST_MODEL, rope_yarn_factor=4.0, rope_original_max_positions=8, rope_attention_factor=1.2),
    "linear": replace(TEST_MODEL, rope_linear_factor=4.0),  # position interpolation (tests/test_linear_rope.py)
    "gemma": GEMMA_MODEL,  # GeGLU, zero-centred RMSNorm, scaled embeddings (tests/test_gemma.py)
    "gemma2": GEMMA2_MODEL,  # Gemma's, post-norms, soft-capped scores and logits (tests/test_gemma2.py)
    "window": replace(TEST_MODEL, sliding_window=5),  # every row passes it (tests/test_sliding_window.py)
    "gemma3": GEMMA3_MODEL,  # Gemma 2's layers with QK norms, the windowed layer's own RoPE (tests/test_gemma3.py)
}
# LongRoPE with a pretraining length of 8 positions: of PROMPTS (4, 9, 2 and 6 tokens) one starts past it, the others
# pass it at three different steps of 12 (tests/test_long_rope.py: against transformers' Phi3)
LONG_ROPE = replace(
    TEST_MODEL,
    rope_short_factor=[1.0, 1.1, 1.3, 1.2, 1.5, 1.4, 1.1, 1.0],
    rope_long_factor=[1.0, 1.5, 2.5, 3.5, 5.0, 4.0, 6.0, 8.0],
    rope_original_max_positions=8,
    rope_attention_factor=1.2,
)


@pytest.mark.parametrize("decoder", ["lean", "megatron"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_greedy_equals_recompute_loop_for_a_batch_of_different_lengths(
    layout, decoder: str, shape: str
) -> None:
    generator = _generator(layout, decoder=decoder, model=SHAPES[shape])
    assert generator.decoder.__name__ == {"lean": "LeanDecoder", "megatron": "MegatronDecoder"}[decoder]
    completions = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=12)] * len(PROMPTS))
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == _argmax_loop(generator, prompt, 12)
        assert completion.finish_reason == FinishReason.length
        assert completion.prompt_tokens == len(prompt)
        assert completion.text == TOKENIZER.decode(completion.token_ids)


def test_each_row_passes_longropes_pretraining_length_as_its_own_forward_does(layout) -> None:
    """Rows of one batch crossing the pretraining length at different steps (each then computes its cache again with
    the long factors), two leaving the batch before the last crosses, decode as the whole sequence's forward,
    recomputed row by row, does."""
    generator = _generator(layout, decoder="lean", model=LONG_ROPE)
    steps = [12, 3, 12, 4]
    completions = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=n, logprobs=True) for n in steps])
    for prompt, completion, n in zip(PROMPTS, completions, steps):
        assert completion.token_ids == _argmax_loop(generator, prompt, n)
        assert completion.logprobs is not None
        for k, token in enumerate(completion.token_ids):  # each step's log-probability: its own sequence's forward
            ids = torch.tensor([prompt + completion.token_ids[:k]])
            with runtime.inference():
                logits = generator.model(ids, torch.arange(ids.shape[1])[None], None)[0, -1, : TOKENIZER.vocab_size]
            whole = float(torch.log_softmax(logits.double(), dim=-1)[token])
            assert completion.logprobs[k].logprob == pytest.approx(whole, abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_lean_decoder_logits_equal_megatron_decoder_logits_step_by_step(layout, shape: str) -> None:
    chunk = _chunks(SHAPES[shape], layout)[0].eval()
    tokens = torch.tensor([PROMPTS[1], PROMPTS[1][::-1]])
    lean, reference = LeanDecoder(chunk, layout, 32), MegatronDecoder(chunk, layout, 32)
    with runtime.inference():
        pairs = [(lean.add(tokens[:, :4].tolist(), 32)[0], reference.add(tokens[:, :4].tolist(), 32)[0])]
        pairs += [(lean.step(tokens[:, i]), reference.step(tokens[:, i])) for i in range(4, 9)]
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape == (2, SHAPES[shape].padded_vocab_size)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()


LEARNED_POSITIONS = replace(TEST_MODEL, position_embedding_type=PositionEmbedding.learned_absolute)


def test_models_the_lean_loop_cannot_run_use_megatrons_decoder(layout) -> None:
    learned = LEARNED_POSITIONS
    assert _generator(layout, model=learned).decoder is MegatronDecoder
    with pytest.raises(ValueError, match="position embeddings are not"):
        _generator(layout, model=learned, decoder="lean")
    completion = _generator(layout, model=learned).generate(PROMPTS[:1], [SamplingParams(max_new_tokens=5)])[0]
    assert len(completion.token_ids) == 5
    gelu = replace(TEST_MODEL, activation=Activation.gelu, ffn_hidden_size=256)  # an ungated MLP: lean runs it
    assert _generator(layout, model=gelu).decoder is LeanDecoder


def test_rows_are_independent_of_their_batch(generator: Generator) -> None:
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 5, 7)]
    together = generator.generate(PROMPTS, params)
    for prompt, setting, batched in zip(PROMPTS, params, together):
        alone = generator.generate([prompt], [setting])[0]
        assert batched.token_ids == alone.token_ids
        assert len(alone.token_ids) == setting.max_new_tokens


def test_stop_token_ends_a_row_early_and_is_not_returned(layout) -> None:
    free = _generator(layout).generate(PROMPTS[:1], [SamplingParams(max_new_tokens=12)])[0].token_ids
    stop = free[4]
    first = free.index(stop)
    stopped = _generator(layout, stop_ids=[stop]).generate(PROMPTS[:1], [SamplingParams(max_new_tokens=12)])[0]
    assert stopped.token_ids == free[:first]
    assert stopped.finish_reason == FinishReason.stop


def test_stop_string_cuts_the_text_and_the_stream_equals_the_final_text(generator: Generator) -> None:
    free = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=16)] * len(PROMPTS))
    text = free[1].text
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    params = [
        SamplingParams(max_new_tokens=16, stop=(stop,)) if i == 1 else SamplingParams(max_new_tokens=16)
        for i in range(len(PROMPTS))
    ]
    streamed = {i: "" for i in range(len(PROMPTS))}
    finished = Counter()
    for deltas in generator.stream(PROMPTS, params):
        for delta in deltas:
            assert finished[delta.index] == 0, "no text after a row finished"
            streamed[delta.index] += delta.text
            finished[delta.index] += delta.finish_reason is not None
    final = generator.generate(PROMPTS, params)
    assert finished == Counter({i: 1 for i in range(len(PROMPTS))})
    assert final[1].text == text[: text.index(stop)] and final[1].finish_reason == FinishReason.stop
    assert [streamed[i] for i in range(len(PROMPTS))] == [c.text for c in final]
    assert [c.text for i, c in enumerate(final) if i != 1] == [c.text for i, c in enumerate(free) if i != 1]
    # a generator's own stop strings (a nemo-tokenized model's end of turn is text) stop every row
    always = Generator([generator.model], TOKENIZER, generator.layout, 128, (), stop_strings=(stop,))
    [cut] = always.generate(PROMPTS[1:2], [SamplingParams(max_new_tokens=16)])
    assert cut.text == final[1].text and cut.finish_reason == FinishReason.stop


def test_sampling_is_seeded_and_top_k_one_is_greedy(generator: Generator) -> None:
    greedy = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=10)] * 4)
    hot = [SamplingParams(max_new_tokens=10, temperature=5.0, seed=s) for s in (1, 1, 2, 3)]
    first = generator.generate([PROMPTS[0]] * 4, hot)
    again = generator.generate([PROMPTS[0]] * 4, hot)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert first[0].token_ids == first[1].token_ids and first[0].token_ids != first[2].token_ids
    top1 = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=10, temperature=5.0, top_k=1, seed=9)] * 4)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


def test_sample_follows_temperature_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    draws = 4000

    def frequencies(params: SamplingParams) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(draws)]
        tokens = sample(logits, [params] * draws, generators)
        return torch.bincount(tokens, minlength=4).float() / draws

    assert torch.allclose(frequencies(SamplingParams(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    top_p = frequencies(SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 < 0.7, 0.8 ≥ 0.7: two tokens
    assert top_p[2:].sum() == 0 and torch.allclose(top_p[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    top_k = frequencies(SamplingParams(temperature=1.0, top_k=3))
    assert top_k[3] == 0 and torch.allclose(top_k[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    cold = frequencies(SamplingParams(temperature=0.25))  # p^4 renormalised: 0.5 dominates
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 4
    assert torch.allclose(cold, expected / expected.sum(), atol=0.03)


def test_a_rounding_error_in_the_logits_does_not_change_the_draws() -> None:
    """Another TP size or kernel rounds the logits differently; in a flat distribution near-equal tokens then swap
    places in probability order, which must not change what a seeded draw picks."""
    flat = torch.randn(1, 700, generator=torch.Generator().manual_seed(0)) * 0.05
    rounded = flat + torch.randn(1, 700, generator=torch.Generator().manual_seed(1)) * 1e-6
    draws = 2000
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=500, top_p=0.9)):
        first, second = (
            sample(logits.repeat(draws, 1), [params] * draws, [torch.Generator().manual_seed(i) for i in range(draws)])
            for logits in (flat, rounded)
        )
        assert torch.equal(first, second)


def test_sequence_limit_ends_rows_with_length_and_long_prompts_are_refused(layout) -> None:
    short = _generator(layout, limit=12)
    completion = short.generate([PROMPTS[1]], [SamplingParams(max_new_tokens=50)])[0]
    assert len(completion.token_ids) == 12 - len(PROMPTS[1]) and completion.finish_reason == FinishReason.length
    with pytest.raises(PromptTooLong, match="prompt 1 has 12 tokens"):
        short.stream([PROMPTS[0], list(range(2, 14))], [SamplingParams()] * 2)
    with pytest.raises(ValueError, match="top_p"):
        short.generate([PROMPTS[0]], [SamplingParams(top_p=0)])
    with pytest.raises(ValueError, match="outside the tokenizer"):
        short.generate([[2, TOKENIZER.vocab_size]], [SamplingParams()])


def test_what_pipelined_generation_cannot_run_and_sequence_parallel_are_refused(layout) -> None:
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=7)
    pp2 = dataclasses.replace(layout, pp=2)
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size"):
        Generator(chunks * 2, TOKENIZER, pp2, 128, ())
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size.*decoder=megatron was chosen"):
        Generator(chunks, TOKENIZER, pp2, 128, (), decoder="megatron")
    learned = build_model_chunks(LEARNED_POSITIONS, PrecisionConfig(), layout, seed=7)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size.*cannot run this model: position embeddings"):
        Generator(learned, TOKENIZER, pp2, 128, ())
    with pytest.raises(ConfigError, match="sequence_parallel"):
        Generator(chunks, TOKENIZER, dataclasses.replace(layout, sequence_parallel=True), 128, ())


def _run(tp: int, pp: int = 1, shape: str = "gqa", prefill_tokens: int = PREFILL_TOKENS) -> dict:
    """Greedy and sampled tokens, their log-probabilities and prompt log-probabilities at TP=`tp` x PP=`pp`, with
    every decoder that runs the layout (megatron's only unpipelined); `prefill_tokens` the lean decoder's prefill
    chunks."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = runtime.initialize(parallel, seed=0)
    try:
        out = {}
        model = LONG_ROPE if shape == "long_rope" else SHAPES[shape]
        for decoder in ("lean", "megatron")[: 1 if pp > 1 or model.long_rope else 2]:
            generator = _generator(layout, decoder=decoder, model=model, prefill_tokens=prefill_tokens)
            greedy = generator.generate(
                PROMPTS, [SamplingParams(max_new_tokens=12, logprobs=True, top_logprobs=2)] * len(PROMPTS)
            )
            out[f"{decoder}_logprobs"] = [[(x.logprob, x.top) for x in c.logprobs or []] for c in greedy]
            scored = generator.generate(PROMPTS, [SamplingParams(1, prompt_logprobs=True, top_logprobs=3)] * 4)
            out[f"{decoder}_logprobs"] += [[(x.logprob, x.top) for x in c.prompt_logprobs or []] for c in scored]
            sampled = generator.generate(
                PROMPTS,
                [
                    SamplingParams(max_new_tokens=12 - 3 * i, temperature=1.5, top_p=0.9, seed=i)
                    for i in range(len(PROMPTS))
                ],
            )
            out[decoder] = {"greedy": [c.token_ids for c in greedy], "sampled": [c.token_ids for c in sampled]}
        return out
    finally:
        runtime.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gqa", "biased", "gemma2"])
def test_tp2_generates_what_tp1_generates(shape: str) -> None:
    """`biased`: each rank adds its slice of the column-parallel layers' biases before the activation and the whole
    bias of a row-parallel layer once, after the ranks' partial products are summed."""
    tp1 = run_distributed(_run, 1, 1, 1, shape)[0]
    tp2 = run_distributed(_run, 2, 2, 1, shape)
    logprobs = {run: [out.pop(f"{d}_logprobs") for d in ("lean", "megatron")] for run, out in enumerate([tp1, *tp2])}
    assert tp2[0] == tp2[1], "both tensor-parallel ranks hold the same tokens"
    assert tp2[0] == tp1
    assert tp1["lean"] == tp1["megatron"]
    # the log-probabilities too, to rounding (the TP ranks sum partial products in another order)
    flat = {
        run: [v for d in runs for row in d for lp, top in row for v in (lp, *(x for _, x in top))]
        for run, runs in logprobs.items()
    }
    ids = {run: [i for d in runs for row in d for _, top in row for i, _ in top] for run, runs in logprobs.items()}
    assert ids[0] == ids[1] == ids[2]
    assert flat[1] == pytest.approx(flat[0], abs=1e-4) and flat[2] == flat[1]


@pytest.mark.slow
def test_longrope_rows_decode_at_tp2_and_pp2_as_at_one_rank() -> None:
    """The cache a row computes again when it passes LongRoPE's pretraining length: a collective of the TP ranks, and
    a forward through the pipeline's stages in turn, which every rank makes at the same step."""
    (tp1,) = run_distributed(_run, 1, 1, 1, "long_rope")
    for tp, pp in ((2, 1), (1, 2)):
        ranks = run_distributed(_run, 2, tp, pp, "long_rope")
        assert ranks[0] == ranks[1] and ranks[0]["lean"] == tp1["lean"], (tp, pp)
        got, expected = (
            [v for row in run["lean_logprobs"] for lp, top in row for v in (lp, *(x for _, x in top))]
            for run in (ranks[0], tp1)
        )
        assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gqa", "tied_mha"])
def test_pipelined_generation_gives_the_tokens_of_one_stage(shape: str) -> None:
    """PP=2 and TP=2 x PP=2: every rank holds the tokens and log-probabilities TP=1 makes (the tied embeddings'
    output layer on the last stage included): prompts of four lengths prefilled together, sampled rows leaving
    the batch at four different steps, prompt log-probabilities through the last stage's broadcast spans. At PP=2
    the prompts are also prefilled two positions at a time (8 tokens of 4 rows a forward, chunks crossing the
    stages in turn)."""
    (tp1,) = run_distributed(_run, 1, 1, 1, shape)
    for tp, pp, chunked in ((1, 2, PREFILL_TOKENS), (1, 2, 8), (2, 2, PREFILL_TOKENS)):
        ranks = run_distributed(_run, tp * pp, tp, pp, shape, chunked)
        assert all(rank == ranks[0] for rank in ranks), "every rank of every stage holds the same figures"
        assert ranks[0]["lean"] == tp1["lean"], (tp, pp, chunked)
        got, expected = ranks[0]["lean_logprobs"], tp1["lean_logprobs"]
        assert [t for row in got for _, top in row for t, _ in top] == [
            t for row in expected for _, top in row for t, _ in top
        ]
        flat = [v for row in got for lp, top in row for v in (lp, *(x for _, x in top))]
        assert flat == pytest.approx(
            [v for row in expected for lp, top in row for v in (lp, *(x for _, x in top))], abs=1e-4
        )


class _Bytes:
    """A byte-level tokenizer: one token per UTF-8 byte, so characters arrive in pieces."""

    vocab_size, pad_id = 256, 0

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "stop, expected, reason", [(("wö",), "héllo ", FinishReason.stop), ((), "héllo wörld ✓", FinishReason.length)]
)
def test_streamed_text_never_splits_a_character_and_cuts_stop_strings(stop, expected, reason) -> None:
    from steerlm.inference.generate import _Row

    text = "héllo wörld ✓".encode()
    row = _Row(0, [1], SamplingParams(max_new_tokens=len(text), stop=stop), track_text=True)
    pieces = []
    for byte in text:
        row.push(byte, _Bytes(), frozenset(), at_limit=False)
        delta = row.delta()
        if delta is not None:
            pieces.append(delta.text)
        if row.finish:
            break
    assert "".join(pieces) == expected == row.text and row.finish == reason
    assert not any("\ufffd" in piece for piece in pieces)


def test_inference_runs_one_replica_over_all_launched_ranks(monkeypatch) -> None:
    from steerlm.inference.loading import check_inference_layout

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_inference_layout(ParallelConfig(tensor_model_parallel_size=2), [TEST_MODEL])
    with pytest.raises(ConfigError) as error:
        check_inference_layout(ParallelConfig(), [TEST_MODEL])
    assert error.value.key == "parallel.tensor_model_parallel_size" and "2 processes would hold 2 copies" in str(
        error.value
    )
    check_inference_layout(ParallelConfig(pipeline_model_parallel_size=2), [TEST_MODEL])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="launch exactly 2 process.*tensor_model_parallel_size=2"):
        check_inference_layout(ParallelConfig(pipeline_model_parallel_size=2), [TEST_MODEL])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError):  # 4 heads do not split over 3 ranks
        check_inference_layout(ParallelConfig(tensor_model_parallel_size=3), [TEST_MODEL])


def _finish(decoding: Decoding, outcome: StepOutcome) -> dict[int, list[int]]:
    """Advance until the batch is empty; every finished row's tokens by key (`outcome`: the last step's)."""
    tokens = {row.index: row.generated for row in outcome.finished}
    while decoding.rows:
        tokens.update((row.index, row.generated) for row in decoding.advance().finished)
    return tokens


def test_a_seeded_row_samples_what_it_samples_alone_when_it_joins_a_running_batch(generator: Generator) -> None:
    """Rows 1 and 2 decode (one sampled, one greedy) when row 0 joins at step 3 with a prompt of another
    length: every row's tokens equal its solo generation (each row's generator draws only for its own tokens)."""
    params = {
        0: SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5),
        1: SamplingParams(max_new_tokens=12, temperature=1.5, top_k=20, seed=7),
        2: SamplingParams(max_new_tokens=6),
    }
    prompts = {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[3]}
    alone = {k: generator.generate([prompts[k]], [params[k]])[0].token_ids for k in params}
    decoding = Decoding(generator, track_text=False)
    early = {}
    for step in range(3):
        joins = [RowRequest(k, prompts[k], params[k]) for k in (1, 2)] if step == 0 else []
        early.update((row.index, row.generated) for row in decoding.advance(joins).finished)
    together = _finish(decoding, decoding.advance([RowRequest(0, prompts[0], params[0])]))
    assert {**early, **together} == alone and len(set(map(tuple, alone.values()))) == 3


def test_rows_leave_when_named_and_a_failing_row_fails_alone(generator: Generator) -> None:
    decoding = Decoding(generator)
    first = decoding.advance(
        [
            RowRequest(0, PROMPTS[0], SamplingParams(max_new_tokens=50)),
            RowRequest(1, PROMPTS[1], SamplingParams(max_new_tokens=4)),
            RowRequest(2, PROMPTS[2], SamplingParams(top_p=0.0)),  # refused by its checks, alone
        ]
    )
    assert [key for key, _ in first.failed] == [2] and "top_p" in str(first.failed[0][1])
    assert {d.index for d in first.deltas} <= {0, 1} and decoding.steps == 1
    left = decoding.advance(leaves=[0])  # row 0's client went away: it decodes no further step
    assert [row.index for row in decoding.rows] == [1] and {d.index for d in left.deltas} <= {1}
    broken = replace(SamplingParams(temperature=1.0), top_p=None)  # passes no check: made to fail in sampling
    decoding.rows[0].params = broken
    failed = decoding.advance([RowRequest(3, PROMPTS[3], SamplingParams(max_new_tokens=3))])
    assert [key for key, _ in failed.failed] == [1] and isinstance(failed.failed[0][1], RowFailed)
    assert (
        _finish(decoding, failed)[3]
        == generator.generate([PROMPTS[3]], [SamplingParams(max_new_tokens=3)])[0].token_ids
    )


def _full_logprobs(generator: Generator, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The reference: one cache-free forward pass over prompt + generated; the log-softmax at each position
    that predicted a generated token [len(generated), vocab]."""
    ids = list(prompt) + list(generated)
    with runtime.inference():
        logits = generator.model(torch.tensor([ids]), torch.arange(len(ids))[None], None)
    return torch.log_softmax(logits[0, len(prompt) - 1 : -1, : TOKENIZER.vocab_size].double(), dim=-1)


@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_logprobs_are_the_models_own_and_the_stream_carries_each_once(layout, decoder: str) -> None:
    generator = _generator(layout, decoder=decoder)
    params = [
        SamplingParams(max_new_tokens=9, logprobs=True, top_logprobs=3),  # greedy
        SamplingParams(max_new_tokens=7, temperature=1.5, top_p=0.9, seed=4, logprobs=True, top_logprobs=5),
        SamplingParams(max_new_tokens=8, logprobs=True),  # no alternatives
        SamplingParams(max_new_tokens=6),  # none asked for
    ]
    completions = generator.generate(PROMPTS, params)
    assert completions[3].logprobs is None
    for prompt, setting, completion in zip(PROMPTS[:3], params[:3], completions[:3]):
        assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
        reference = _full_logprobs(generator, prompt, completion.token_ids)
        for position, (token, item) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert item.token_id == token
            # untempered: the model's distribution, also for the row sampled at temperature 1.5
            assert item.logprob == pytest.approx(float(reference[position, token]), abs=1e-4)
            best = reference[position].topk(setting.top_logprobs)
            assert [i for i, _ in item.top] == best.indices.tolist()
            assert [v for _, v in item.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        if setting.temperature == 0 and setting.top_logprobs:  # a greedy token is the most likely one
            assert all(item.top[0] == (item.token_id, item.logprob) for item in completion.logprobs)
    streamed: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    ids: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    for deltas in generator.stream(PROMPTS, params):
        for delta in deltas:
            streamed[delta.index] += delta.logprobs
            ids[delta.index] += delta.token_ids
    assert [streamed[i] for i in range(3)] == [c.logprobs for c in completions[:3]]
    assert streamed[3] == []
    assert [ids[i] for i in range(4)] == [c.token_ids for c in completions]  # every row's ids, once each


def test_logprobs_and_token_ids_exclude_the_stop_token_which_the_last_delta_names(layout) -> None:
    free = _generator(layout).generate(PROMPTS[:1], [SamplingParams(max_new_tokens=12, logprobs=True)])[0]
    stop = free.token_ids[4]
    stopped = _generator(layout, stop_ids=[stop]).generate(
        PROMPTS[:1], [SamplingParams(max_new_tokens=12, logprobs=True)]
    )[0]
    cut = free.token_ids.index(stop)
    assert stopped.logprobs == free.logprobs[:cut]
    streamed = [
        d for deltas in _generator(layout, stop_ids=[stop]).stream(PROMPTS[:1], [SamplingParams(12)]) for d in deltas
    ]
    assert [d.stop_token for d in streamed] == [None] * (len(streamed) - 1) + [stop]  # named on the last delta
    assert [t for d in streamed for t in d.token_ids] == free.token_ids[:cut]
    assert all(d.stop_logprob is None for d in streamed)  # not asked for
    scored = _generator(layout, stop_ids=[stop]).stream(PROMPTS[:1], [SamplingParams(12, logprobs=True)])
    last = [d for deltas in scored for d in deltas][-1]
    assert last.stop_logprob == free.logprobs[cut]  # the stop token's, where the free run generated it


@pytest.mark.parametrize(
    "setting", [dict(top_logprobs=2), dict(logprobs=True, top_logprobs=21), dict(logprobs=True, top_logprobs=-1)]
)
def test_top_logprobs_out_of_range_or_without_logprobs_is_refused(setting) -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(**setting).validate()


def _prompt_reference(generator: Generator, prompt: list[int]) -> torch.Tensor:
    """The reference: a cache-free forward pass over the prompt; the log-softmax at each position but the last
    [len(prompt) - 1, vocab] (position i predicts token i + 1)."""
    with runtime.inference():
        logits = generator.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], None)
    return torch.log_softmax(logits[0, :-1, : TOKENIZER.vocab_size].double(), dim=-1)


@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_prompt_logprobs_score_every_prompt_token_given_those_before_it(layout, decoder: str, monkeypatch) -> None:
    """Each prompt token after the first gets its log-probability and alternatives from the prefill, which
    hands them out in spans (3 positions here, so spans end inside prompts); rows that do not ask get none,
    and the first delta of a row carries them once."""
    monkeypatch.setattr("steerlm.inference.generate.PROMPT_SPAN", 3)
    generator = _generator(layout, decoder=decoder)
    params = [
        SamplingParams(max_new_tokens=3, prompt_logprobs=True, top_logprobs=4),
        SamplingParams(max_new_tokens=2, prompt_logprobs=True, logprobs=True),  # no alternatives
        SamplingParams(max_new_tokens=4),  # none asked for
        SamplingParams(max_new_tokens=5, temperature=1.2, seed=3, prompt_logprobs=True, top_logprobs=2),
    ]
    completions = generator.generate(PROMPTS, params)
    assert completions[2].prompt_logprobs is None
    for prompt, setting, completion in zip(PROMPTS, params, completions):
        if not setting.prompt_logprobs:
            continue
        reference = _prompt_reference(generator, prompt)
        scored = completion.prompt_logprobs
        assert scored is not None and [x.token_id for x in scored] == prompt[1:]
        for position, item in enumerate(scored):
            assert item.logprob == pytest.approx(float(reference[position, prompt[position + 1]]), abs=1e-4)
            best = reference[position].topk(setting.top_logprobs)
            assert [i for i, _ in item.top] == best.indices.tolist()
            assert [v for _, v in item.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # the generated tokens are those of a row that did not ask
    plain = generator.generate(PROMPTS, [replace(p, prompt_logprobs=False, top_logprobs=0) for p in params])
    assert [c.token_ids for c in completions] == [c.token_ids for c in plain]
    firsts: dict[int, list] = {}
    for deltas in generator.stream(PROMPTS, params):
        for delta in deltas:
            firsts.setdefault(delta.index, []).append(delta.prompt_logprobs)
    for index, completion in enumerate(completions):
        expected = None if completion.prompt_logprobs is None else tuple(completion.prompt_logprobs)
        assert firsts[index][0] == expected and all(later is None for later in firsts[index][1:])


@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_a_row_with_nothing_to_generate_scores_its_prompt_and_leaves_at_its_prefill(layout, decoder: str) -> None:
    """max_new_tokens=0 beside rows that generate: it finishes at the prefill with its prompt's log-probabilities
    (those a generating row gets) and no tokens; the other rows generate what they generate without it."""
    generator = _generator(layout, decoder=decoder)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=True, top_logprobs=2)
    params = [SamplingParams(max_new_tokens=5), scored, SamplingParams(max_new_tokens=4), scored]
    out = generator.generate(PROMPTS, params)
    alone = generator.generate(PROMPTS, [replace(p, max_new_tokens=3) for p in params])
    for index in (1, 3):
        assert (out[index].token_ids, out[index].finish_reason) == ([], FinishReason.length)
        assert out[index].prompt_logprobs == alone[index].prompt_logprobs
    plain = generator.generate([PROMPTS[0], PROMPTS[2]], [params[0], params[2]])
    assert [out[0].token_ids, out[2].token_ids] == [c.token_ids for c in plain]
    deltas = [d for step in generator.stream(PROMPTS[1:2], [scored]) for d in step]
    assert len(deltas) == 1 and deltas[0].finish_reason == FinishReason.length
    assert deltas[0].prompt_logprobs == tuple(out[1].prompt_logprobs or ())


def test_a_one_token_prompt_has_no_prompt_logprobs(layout) -> None:
    out = _generator(layout).generate([[2]], [SamplingParams(max_new_tokens=2, prompt_logprobs=True)])[0]
    assert out.prompt_logprobs == [] and len(out.token_ids) == 2


class _Pieces:
    """SentencePiece's way with word boundaries: every token is a word with its boundary space ("▁w"), and a
    text's leading space is dropped, so a word's text depends on whether anything precedes it."""

    vocab_size = TOKENIZER.vocab_size

    def decode(self, ids) -> str:
        return "".join(f" w{i}" for i in ids).removeprefix(" ")


@pytest.mark.parametrize("stream", [False, True])
def test_text_after_prompt_is_what_the_answer_adds_to_the_prompts_text(layout, stream: bool) -> None:
    """On its own an answer's text starts with its first word; after the prompt, with the space between them."""
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=7)
    generator, pieces = Generator(chunks, _Pieces(), layout, 64, ()), _Pieces()  # type: ignore[arg-type]

    def texts(after: bool) -> list[str]:
        params = [SamplingParams(max_new_tokens=6, text_after_prompt=after)] * len(PROMPTS)
        if not stream:
            return [c.text for c in generator.generate(PROMPTS, params)]
        out = [""] * len(PROMPTS)
        for deltas in generator.stream(PROMPTS, params):
            for delta in deltas:
                out[delta.index] += delta.text
        return out

    ids = [c.token_ids for c in generator.generate(PROMPTS, [SamplingParams(max_new_tokens=6)] * len(PROMPTS))]
    assert texts(False) == [pieces.decode(answer) for answer in ids]
    assert texts(True) == [pieces.decode(p + a)[len(pieces.decode(p)) :] for p, a in zip(PROMPTS, ids)]
    assert texts(True) == [" " + text for text in texts(False)]
