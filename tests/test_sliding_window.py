"""Sliding-window attention (`model.sliding_window`, `model.window_attn_skip_freq`): each query of a sliding layer
attends to the `sliding_window` positions up to its own, itself included, as transformers' Mistral, Phi-3 and Gemma 2
count them.

Checked against transformers: a checkpoint with a window on every layer, exported at TP=2, is a MistralForCausalLM with
steerlm's logits past the window and imports back bitwise, and the lean decoder's greedy tokens past the window are HF
`generate`'s; Gemma 2's windows on every other layer export as its layer types with its logits. Another tool's Mistral,
Phi-3 and Gemma 2 with windows import with them (tests/test_qwen_mistral.py, tests/test_phi3.py, tests/test_gemma2.py);
a Qwen2's windows on its last layers are not steerlm's and still limit the positions. The mask is megatron's own
sliding-window mask; a chunked prefill, decode steps and shared-prefix scoring mask as a whole sequence's forward does;
both decoders decode as the recompute loop does (tests/test_generate.py, `window`); training at TP=2 and PP=2:
tests/test_parallel_parity.py (`gemma2`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlm import runtime
from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ModelFormat
from steerlm.config.schema import TransformerImpl
from steerlm.config.validation import Accelerator, resolve_transformer_impl
from steerlm.data.collate import pad_batch
from steerlm.inference import SamplingParams
from steerlm.inference.decoders import LeanDecoder
from steerlm.inference.prefix_scoring import grouped_log_probs
from steerlm.megatron_compat import sliding_window_mask
from steerlm.models.gpt import build_model_chunks
from steerlm.models.hf_config import hf_model_fields, unmodelled_window
from steerlm.models.hf_llama import GEMMA2, LLAMA, MISTRAL, hf_architecture, hf_config_dict
from steerlm.stages.convert import convert
from steerlm.training import SEQUENCE_LOG_PROB, predict
from steerlm.training.init_from import resolve_init_source
from tests.conftest import GEMMA2_MODEL, TEST_MODEL
from tests.hf_family_checks import check_export, check_lean_greedy, exported_at_tp2
from tests.test_convert import _checkpoint, _convert
from tests.test_generate import PROMPTS, _argmax_loop, _generator
from tests.test_prefix_scoring import _flat, _groups
from tests.test_qwen_mistral import HF_SHAPE, TOKENS, _randomise_vectors

transformers = pytest.importorskip("transformers")

# a window on every layer, shorter than TOKENS' 20 positions and than the greedy test's prompts plus new tokens
WINDOW_MODEL = replace(TEST_MODEL, sliding_window=6, layernorm_epsilon=1e-6)
# Gemma 2's: on every other layer (the first, counted from 0)
GEMMA2_WINDOW = replace(GEMMA2_MODEL, sliding_window=6, window_attn_skip_freq=2)


def test_the_mask_is_megatrons_sliding_window_mask(layout) -> None:
    """Queries the last of the keys (a prefill, a chunk after cached positions, a decode step), as megatron's own
    attention masks a window of `window_size=(window - 1, 0)`."""
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    for queries, keys, window in ((10, 10, 3), (4, 12, 5), (1, 9, 4), (7, 7, 7), (6, 6, 20)):
        ours = sliding_window_mask(queries, keys, window, torch.device("cpu"))
        masked = get_sliding_window_causal_mask(queries, keys, (window - 1, 0)).cpu()
        assert torch.equal(ours, ~masked), (queries, keys, window)
    assert sliding_window_mask(3, 3, 2, torch.device("cpu")).tolist() == [
        [True, False, False],
        [True, True, False],
        [False, True, True],
    ]


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("windows")
    return {
        name: exported_at_tp2(layout, root / name, model, _randomise_vectors(layout))
        for name, model in (("mistral", WINDOW_MODEL), ("gemma2", GEMMA2_WINDOW))
    }


@pytest.mark.slow
def test_a_window_on_every_layer_exports_at_tp2_as_a_mistral_with_steerlm_logits_past_it(layout, exported) -> None:
    assert (
        hf_architecture(WINDOW_MODEL) == MISTRAL
        and hf_architecture(replace(WINDOW_MODEL, sliding_window=None)) == LLAMA
    )
    hf = check_export(layout, exported["mistral"], WINDOW_MODEL, TOKENS, "MistralForCausalLM")
    assert hf.config.sliding_window == 6
    with torch.no_grad():  # the window bites: without it transformers' logits differ
        windowed = hf(TOKENS).logits
        hf.config.sliding_window = None
        assert (hf(TOKENS).logits - windowed).abs().max() > 1e-3


@pytest.mark.slow
def test_greedy_tokens_of_the_lean_decoder_past_the_window_equal_hf_generate(layout, exported) -> None:
    check_lean_greedy(layout, exported["mistral"]["run"], exported["mistral"]["hf"], TOKENS)


@pytest.mark.slow
def test_gemma2_s_windows_on_every_other_layer_export_as_its_layer_types(layout, exported) -> None:
    assert hf_architecture(GEMMA2_WINDOW) == GEMMA2
    hf = check_export(layout, exported["gemma2"], GEMMA2_WINDOW, TOKENS, "Gemma2ForCausalLM")
    assert hf.config.sliding_window == 6 and hf.config.layer_types == ["sliding_attention", "full_attention"]
    check_lean_greedy(layout, exported["gemma2"]["run"], exported["gemma2"]["hf"], TOKENS)


def test_a_chunked_prefill_and_decode_steps_past_the_window_give_the_recompute_loop_s_tokens(layout) -> None:
    """Prefill chunks of two positions per row (each after the cached ones), then decode steps, every row passing the
    window at its own step."""
    generator = _generator(layout, decoder="lean", model=replace(TEST_MODEL, sliding_window=5), prefill_tokens=8)
    completions = generator.generate(PROMPTS, [SamplingParams(max_new_tokens=12)] * len(PROMPTS))
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == _argmax_loop(generator, prompt, 12)


def test_shared_prefix_scores_of_a_windowed_model_equal_whole_sequences(layout) -> None:
    """The continuations of shared prefixes (prefixes of 0 to 30 positions, longer and shorter than the window) see the
    window of their own positions, as a forward of each whole sequence does."""
    model = replace(TEST_MODEL, sliding_window=6)
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=7)[0].eval()
    groups = _groups()
    with runtime.inference():
        shared = grouped_log_probs(LeanDecoder(chunk, layout, model.max_position_embeddings), groups)
    whole = [predict([chunk], [pad_batch(group, 0)], layout, SEQUENCE_LOG_PROB)[0].tolist() for group in groups]
    np.testing.assert_allclose(_flat(shared), _flat(whole), rtol=1e-5)


def test_qwen2_s_windows_on_its_last_layers_still_limit_the_positions() -> None:
    """Qwen2 slides its layers from `max_window_layers` on: no `window_attn_skip_freq` says that, so the window is the
    model's positions instead, as before steerlm modelled windows."""
    config = transformers.Qwen2Config(**HF_SHAPE, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    written = {**config.to_dict(), "model_type": "qwen2"}
    assert unmodelled_window(written) == 64
    fields = hf_model_fields(written, "input", "x")
    assert fields["sliding_window"] is None and fields["window_attn_skip_freq"] is None
    mistral = {**hf_config_dict(WINDOW_MODEL)}
    assert unmodelled_window(mistral) is None and hf_model_fields(mistral, "input", "x")["sliding_window"] == 6


def test_a_window_is_checked_on_init_from_refused_on_nemo_export_and_validated(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "sft", WINDOW_MODEL)
    assert resolve_init_source("sft.init_from", str(run), WINDOW_MODEL) is not None
    with pytest.raises(ConfigError, match="was written for model.sliding_window=6") as error:
        resolve_init_source("sft.init_from", str(run), replace(WINDOW_MODEL, sliding_window=None))
    assert error.value.key == "model.sliding_window"
    with pytest.raises(ConfigError, match="attends to a sliding window .*no NeMo 1.x model") as error:
        convert(_convert(run, tmp_path / "x.nemo", to=ModelFormat.nemo), layout)
    assert "to=hf (MistralForCausalLM)" in str(error.value)
    for changes, key in (
        ({"sliding_window": 0}, "model.sliding_window"),
        ({"window_attn_skip_freq": 2}, "model.window_attn_skip_freq"),  # without a window
        ({"sliding_window": 4, "window_attn_skip_freq": 1}, "model.window_attn_skip_freq"),
    ):
        with pytest.raises(ConfigError) as refused:
            replace(TEST_MODEL, **changes).validate()
        assert refused.value.key == key
    engine = replace(WINDOW_MODEL, transformer_impl=TransformerImpl.transformer_engine)
    with pytest.raises(ConfigError, match="builds sliding-window attention"):
        resolve_transformer_impl(engine, Accelerator.cuda)
    assert resolve_transformer_impl(WINDOW_MODEL, Accelerator.cuda) == TransformerImpl.local
