"""GPU checks (marker `gpu`; skipped without CUDA): nccl runs, CPU/GPU numerics, a real preset in bf16.

With one GPU only world size 1 runs under nccl, so the layout parity of tests/test_parallel_parity.py
is complemented here by CPU (gloo) vs GPU (nccl) parity on identical weights.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed
from tests.parity_scenarios import REFERENCES, run_all

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cpu") / "reference.pt"
    script = (
        "import sys, torch; from tests.multiproc import run_distributed; "
        "from tests.parity_scenarios import REFERENCES, run_all; "
        "torch.save(run_distributed(run_all, 1, REFERENCES)[0], sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=ROOT, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    return torch.load(out, weights_only=False)


def test_gpu_nccl_training_matches_cpu_gloo_on_the_same_weights(cpu_reference: dict) -> None:
    scenarios = [replace(s, initial_state=cpu_reference[s.name]["initial"]) for s in REFERENCES]
    gpu = run_distributed(run_all, 1, scenarios)[0]
    for name, expected in cpu_reference.items():
        got = gpu[name]
        assert "backend=nccl device=cuda" in got["layout"]
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4), name
        assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-3), name
        for param, grad in got["grads"].items():
            reference = expected["grads"][param]
            error = ((grad - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
            assert error < 1e-3, f"{name}: gradient of {param} differs by {error:.2e}"


def _train_preset(preset: str, seq_length: int, steps: int) -> dict:
    from steerlm import runtime
    from steerlm.config import ParallelConfig, PrecisionConfig, TrainerConfig, compose, to_typed
    from steerlm.config.schema import DType
    from steerlm.models import build_model_chunks
    from steerlm.training import build_optimizer, microbatches_for_rank, train_step, wrap_for_training

    cfg = to_typed(
        compose(
            "demo",
            [f"model={preset}", "precision=bf16", "optim.lr=1e-4", "optim.min_lr=1e-5", "optim.lr_warmup_steps=0"],
        )
    )
    trainer = TrainerConfig(micro_batch_size=1, global_batch_size=2, seq_length=seq_length, max_steps=steps)
    layout = runtime.initialize(ParallelConfig(), seed=1)
    precision = PrecisionConfig(dtype=DType.bf16)
    chunks = build_model_chunks(cfg.model, precision, layout, seed=1)
    model = wrap_for_training(chunks, precision, False, layout)
    optimizer, scheduler = build_optimizer(model, cfg.optim, precision, trainer, False, layout)
    generator = torch.Generator().manual_seed(0)
    stream = torch.randint(0, cfg.model.vocab_size, (2, seq_length + 1), generator=generator)
    batch = {
        "tokens": stream[:, :-1],
        "labels": stream[:, 1:],
        "loss_mask": torch.ones(2, seq_length),
        "position_ids": torch.arange(seq_length).expand(2, seq_length),
    }
    losses, seconds = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        start = time.perf_counter()
        result = train_step(model, optimizer, scheduler, microbatches_for_rank(batch, 1, layout), layout)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(result.loss)
    out = {
        "losses": losses,
        "seconds": seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "parameters": sum(p.numel() for p in chunks[0].parameters()),
        "vocab": cfg.model.vocab_size,
    }
    runtime.shutdown()
    return out


def test_llama3_2_1b_bf16_forward_backward_on_gpu() -> None:
    """The ~1B preset at TP=1 in bf16: starts at ln(vocab) and fits a repeated batch."""
    result = run_distributed(_train_preset, 1, "llama3_2_1b", 2048, 6)[0]
    print(
        f"\nllama3_2_1b bf16 seq 2048 x 2: losses {[round(x, 3) for x in result['losses']]}, "
        f"step seconds {[round(x, 3) for x in result['seconds']]}, peak {result['peak_gib']:.1f} GiB, "
        f"{result['parameters'] / 1e9:.3f}B parameters (padded vocab)"
    )
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert abs(result["losses"][0] - math.log(result["vocab"])) < 0.5
    assert result["losses"][-1] < result["losses"][0] - 0.5


def test_bf16_checkpoint_resume_on_gpu(tmp_path: Path) -> None:
    """bf16 with fp32 master weights under nccl: 10 steps, checkpoint, resume to 20 ≈ 20 straight steps."""
    from tests.test_checkpoint_resume import check_bf16_resume

    check_bf16_resume(tmp_path)


def _decoders_on_gpu() -> dict:
    """Step-by-step logits of the lean and the megatron decoder, and greedy tokens, on CUDA (fp32 and bf16)."""
    from steerlm import runtime
    from steerlm.config import DType, ParallelConfig, PrecisionConfig
    from steerlm.inference.decoders import LeanDecoder, MegatronDecoder
    from steerlm.models.gpt import build_model_chunks
    from tests.conftest import TEST_MODEL

    layout = runtime.initialize(ParallelConfig(), seed=0)
    out = {}
    try:
        for dtype in (DType.fp32, DType.bf16):
            chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(dtype=dtype), layout, seed=7)[0].eval()
            tokens = torch.randint(
                3,
                TEST_MODEL.vocab_size,
                (4, 12),
                device=layout.device,
                generator=torch.Generator(device=layout.device).manual_seed(1),
            )
            lean, reference = LeanDecoder(chunk, layout, 4, 16), MegatronDecoder(chunk, layout, 4, 16)
            worst = 0.0
            with runtime.inference():
                pairs = [(lean.forward(tokens[:, :6], 0), reference.forward(tokens[:, :6], 0))]
                pairs += [
                    (lean.forward(tokens[:, i : i + 1], i), reference.forward(tokens[:, i : i + 1], i))
                    for i in range(6, 12)
                ]
            for ours, theirs in pairs:
                worst = max(worst, ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item())
            out[dtype.value] = {"device": str(layout.device), "relative": worst}
    finally:
        runtime.shutdown()
    return out


def test_lean_decoder_equals_megatron_decoder_on_gpu() -> None:
    result = run_distributed(_decoders_on_gpu, 1)[0]
    assert result["fp32"]["device"].startswith("cuda")
    assert result["fp32"]["relative"] < 1e-4, result
    assert result["bf16"]["relative"] < 3e-2, result
