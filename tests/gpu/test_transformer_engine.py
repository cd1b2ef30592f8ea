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


def _resumes_across_optimizer_kinds(root: str) -> dict:
    """bf16 losses of both optimizer kinds run straight, and of each resumed from the other's step-2 checkpoint,
    with the Adam megatron picks where Transformer Engine is installed (its fused Adam keeps the step per param
    group, where torch's keeps one per parameter)."""
    from pathlib import Path

    from steerlm import runtime
    from steerlm.checkpoint.sharded import load_checkpoint, save_checkpoint
    from steerlm.config import DType, ParallelConfig, PrecisionConfig, TrainConfig
    from tests.conftest import TEST_MODEL
    from tests.test_megatron_compat import _distributed_adam, _losses

    layout = runtime.initialize(ParallelConfig(), seed=0)
    precision = PrecisionConfig(dtype=DType.bf16)
    out: dict = {}
    try:
        for distributed in (False, True):
            straight = _distributed_adam(layout, distributed, precision)
            out[f"adam_{distributed}"] = type(straight.optimizer.chained_optimizers[0].optimizer).__module__
            out[f"straight_{distributed}"] = _losses(straight, layout, range(5))
            saved = _distributed_adam(layout, distributed, precision)
            _losses(saved, layout, range(2))
            cfg = TrainConfig(
                model=TEST_MODEL, parallel=ParallelConfig(use_distributed_optimizer=distributed), precision=precision
            )
            path = save_checkpoint(Path(root) / str(distributed), 2, saved, layout, cfg)
            other = _distributed_adam(layout, not distributed, precision)
            load_checkpoint(path, other.model, other.optimizer, other.scheduler, layout, TEST_MODEL)
            out[f"resumed_from_{distributed}"] = _losses(other, layout, range(2, 5))
    finally:
        runtime.shutdown()
    return out


def test_either_kind_of_optimizer_resumes_the_others_checkpoint_with_fused_adam(tmp_path) -> None:
    result = run_distributed(_resumes_across_optimizer_kinds, 1, str(tmp_path))[0]
    print(f"\nmegatron's plain and distributed optimizers wrap {result['adam_False']}, {result['adam_True']}")
    for saved in (False, True):
        assert result[f"resumed_from_{saved}"] == pytest.approx(result[f"straight_{saved}"][2:], rel=1e-5)
