"""GPU checks (marker `gpu`; skipped without CUDA): nccl runs, CPU/GPU numerics, a real preset in bf16.

With one GPU only world size 1 runs under nccl, so the layout parity of tests/test_parallel_parity.py
is complemented here by CPU (gloo) vs GPU (nccl) parity on identical weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed
from tests.parity_scenarios import REFERENCES, run_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def assert_matches_cpu(gpu: dict, cpu_reference: dict) -> None:
    """GPU runs of the reference scenarios (from the CPU run's initial weights) against the CPU run: losses, grad
    norms, first-step gradients and logits, to the tolerance of GPU kernels' summation order."""
    for name, expected in cpu_reference.items():
        got = gpu[name]
        assert "device=cuda" in got["layout"]
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4), name
        assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-3), name
        pairs = [(f"gradient of {param}", grad, expected["grads"][param]) for param, grad in got["grads"].items()]
        if expected["logits"] is not None:
            pairs.append(("logits", got["logits"], expected["logits"]))
        for what, ours, reference in pairs:
            error = ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
            assert error < 1e-3, f"{name}: {what} differs by {error:.2e}"


def test_gpu_nccl_training_matches_cpu_gloo_on_the_same_weights(cpu_reference: dict) -> None:
    scenarios = [replace(s, initial_state=cpu_reference[s.name]["initial"]) for s in REFERENCES]
    gpu = run_distributed(run_all, 1, scenarios)[0]
    assert all("backend=nccl" in result["layout"] for result in gpu.values())
    assert_matches_cpu(gpu, cpu_reference)


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


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_bf16_checkpoint_resume_on_gpu(tmp_path: Path, optimizer: str) -> None:
    """bf16 with fp32 master weights under nccl (megatron's plain or distributed optimizer over torch Adam): 10
    steps, checkpoint, resume to 20 ≈ 20 straight steps."""
    from tests.test_checkpoint_resume import check_bf16_resume

    check_bf16_resume(tmp_path, [f"parallel.use_distributed_optimizer={optimizer == 'distributed'}"])


def _decoders_on_gpu(impl: str) -> dict:
    """Step-by-step logits of the lean decoder, its CUDA-graph form and the megatron decoder, on CUDA (fp32 and
    bf16), with megatron's local layers or Transformer Engine's; and greedy generations of the eager and the
    graphed lean decoder (rows finishing at different steps)."""
    from steerlm import runtime
    from steerlm.config import DType, ParallelConfig, PrecisionConfig, TransformerImpl
    from steerlm.inference import Generator, SamplingParams
    from steerlm.inference.decoders import GraphedLeanDecoder, LeanDecoder, MegatronDecoder, lean_unsupported
    from steerlm.models.gpt import build_model_chunks
    from tests.conftest import TEST_MODEL
    from tests.test_generate import PROMPTS, TOKENIZER

    layout = runtime.initialize(ParallelConfig(), seed=0)
    model = replace(TEST_MODEL, transformer_impl=TransformerImpl(impl))
    out = {}
    try:
        for dtype in (DType.fp32, DType.bf16):
            chunks = build_model_chunks(model, PrecisionConfig(dtype=dtype), layout, seed=7)
            chunk = chunks[0].eval()
            tokens = torch.randint(
                3,
                TEST_MODEL.vocab_size,
                (4, 12),
                device=layout.device,
                generator=torch.Generator(device=layout.device).manual_seed(1),
            )
            decoders = [LeanDecoder(chunk, layout, 16), GraphedLeanDecoder(chunk, layout, 16)]
            reference = MegatronDecoder(chunk, layout, 16)
            worst = [0.0, 0.0]
            with runtime.inference():
                for position in range(5, 12):  # a prefill of 6 tokens, then one position at a time
                    outputs = [
                        (
                            decoder.add(tokens[:, :6].tolist(), 16)[0]
                            if position == 5
                            else decoder.step(tokens[:, position])
                        )
                        for decoder in [reference, *decoders]
                    ]
                    theirs = outputs[0].float()
                    for k, ours in enumerate(outputs[1:]):
                        worst[k] = max(worst[k], ((ours.float() - theirs).abs().max() / theirs.abs().max()).item())
            params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 9, 3)]
            generated = {}
            for name, decoder in (("eager", LeanDecoder), ("graphed", GraphedLeanDecoder)):
                generator = Generator(chunks, TOKENIZER, layout, 64, ())
                generator.decoder = decoder
                generated[name] = [c.token_ids for c in generator.generate(PROMPTS, params)]
            out[dtype.value] = {
                "device": str(layout.device),
                "lean": worst[0],
                "graphed": worst[1],
                "lean_supported": lean_unsupported(chunk) is None,
                "tokens": generated,
            }
    finally:
        runtime.shutdown()
    return out


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_lean_and_graphed_decoders_equal_megatron_decoder_on_gpu(impl: str) -> None:
    from steerlm.config.validation import transformer_engine_available

    if impl == "transformer_engine" and not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed")
    result = run_distributed(_decoders_on_gpu, 1, impl)[0]
    assert result["fp32"]["device"].startswith("cuda") and result["fp32"]["lean_supported"]
    assert result["fp32"]["lean"] < 1e-4 and result["fp32"]["graphed"] < 1e-4, result
    assert result["bf16"]["lean"] < 3e-2 and result["bf16"]["graphed"] < 3e-2, result
    assert result["fp32"]["tokens"]["graphed"] == result["fp32"]["tokens"]["eager"]
    assert [len(t) for t in result["fp32"]["tokens"]["graphed"]] == [12, 5, 9, 3]


def _compiled_and_eager_losses() -> dict:
    """The parity scenario's tiny model trained 3 steps eagerly and with `compile_layers`, from one seed."""
    from steerlm import runtime
    from steerlm.config import ParallelConfig, PrecisionConfig
    from steerlm.models import build_model_chunks
    from steerlm.training import build_optimizer, microbatches_for_rank, train_step, wrap_for_training
    from steerlm.training.setup import compile_layers
    from tests.parity_scenarios import ADAM, SEED, TINY, TRAINER, global_batch

    out = {}
    for compiled in (False, True):
        layout = runtime.initialize(ParallelConfig(), seed=SEED)
        chunks = build_model_chunks(TINY, PrecisionConfig(), layout, seed=SEED)
        if compiled:
            compile_layers(chunks)
        model = wrap_for_training(chunks, PrecisionConfig(), False, layout)
        optimizer, scheduler = build_optimizer(model, ADAM, PrecisionConfig(), TRAINER, False, layout)
        out[compiled] = [
            train_step(model, optimizer, scheduler, microbatches_for_rank(global_batch(step), 2, layout), layout).loss
            for step in range(3)
        ]
        runtime.shutdown(destroy_process_group=not compiled)
    return out


def test_compiled_layers_train_like_eager_ones_on_gpu() -> None:
    losses = run_distributed(_compiled_and_eager_losses, 1)[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
