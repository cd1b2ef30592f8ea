"""Transformer Engine layers (the NGC containers' default) against megatron's local layers on one GPU: training
numbers on the same weights, and generation. Skipped without CUDA and transformer_engine; the multi-GPU TE
layout parity is in tests/test_parallel_parity.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from steerlm.config import TransformerImpl
from steerlm.config.validation import transformer_engine_available
from tests.gpu.test_gpu import assert_matches_cpu
from tests.multiproc import run_distributed
from tests.parity_scenarios import REFERENCES, run_all

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not transformer_engine_available(), reason="needs CUDA and TE"),
]
TE = TransformerImpl.transformer_engine


def test_transformer_engine_training_matches_local_layers_on_the_same_weights(cpu_reference: dict) -> None:
    """Losses, grad norms, gradients and logits of TE layers equal the local layers' (CPU reference)."""
    references = [s for s in REFERENCES if s.lora is None]  # LoRA runs on the local layers only (docs/sft.md#lora)
    scenarios = [replace(s, initial_state=cpu_reference[s.name]["initial"], transformer_impl=TE) for s in references]
    expected = {s.name: cpu_reference[s.name] for s in references}
    assert_matches_cpu(run_distributed(run_all, 1, scenarios)[0], expected)


def _generations() -> dict:
    """Greedy generations of the same weights with local and TE layers, through each decoder."""
    from steerlm import runtime
    from steerlm.config import ParallelConfig, PrecisionConfig
    from steerlm.inference import Generator, SamplingParams
    from steerlm.inference.decoders import lean_unsupported
    from steerlm.models.gpt import build_model_chunks
    from steerlm.models.sharding import load_full_parameters, named_global_parameters
    from tests.conftest import TEST_MODEL
    from tests.test_generate import PROMPTS, TOKENIZER

    layout = runtime.initialize(ParallelConfig(), seed=0)
    try:
        local = build_model_chunks(
            replace(TEST_MODEL, transformer_impl=TransformerImpl.local), PrecisionConfig(), layout, 7
        )
        te = build_model_chunks(replace(TEST_MODEL, transformer_impl=TE), PrecisionConfig(), layout, 7)
        load_full_parameters(te, {name: p.detach() for name, p in named_global_parameters(local)}, 0, 1)
        params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 9, 3)]
        out = {"te_lean_supported": lean_unsupported(te[0]) is None}
        for impl, chunks in (("local", local), ("te", te)):
            for decoder in ("lean", "megatron"):
                generator = Generator(chunks, TOKENIZER, layout, 64, (), decoder)
                out[f"{impl}_{decoder}"] = [c.token_ids for c in generator.generate(PROMPTS, params)]
    finally:
        runtime.shutdown()
    return out


def test_generation_under_transformer_engine_equals_local_layers() -> None:
    result = run_distributed(_generations, 1)[0]
    assert result["te_lean_supported"]
    reference = result.pop("local_megatron")
    del result["te_lean_supported"]
    for name, tokens in result.items():
        assert tokens == reference, name
