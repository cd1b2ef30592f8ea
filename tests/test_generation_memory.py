"""The memory estimate of jobs that generate with or score by trained models (`launchers.generation_memory`) against
what a real model holds: the lean decoder's KV cache (bytes exactly), a prefill's transients and a scoring forward's
(counted by `tests.memory_meter.PeakMeter`); and how `python -m launchers … --dry-run` reports it, reading each
checkpoint's saved config."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from launchers.cli import main
from launchers.generation_memory import Role, Workload, held_model, kv_cache_bytes
from steerlm import runtime
from steerlm.config import DType, ModelConfig, ParallelConfig, PrecisionConfig, compose
from steerlm.config.store import save_resolved
from steerlm.inference.decoders import LeanDecoder
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.gpt import build_model_chunks
from tests.conftest import TEST_MODEL, as_nemotron
from tests.memory_meter import PeakMeter

# Llama's proportions at test size: grouped-query attention, ffn = 2.75 x hidden
LLAMA = replace(
    TEST_MODEL,
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=8,
    num_query_groups=2,
    max_position_embeddings=256,
)
SINGLE = ParallelConfig()
NEMOTRON = as_nemotron(LLAMA)  # an ungated MLP (squared ReLU), zero-centred LayerNorm, RoPE on half of each head
QWEN3 = replace(LLAMA, qk_layernorm=True)  # QK norms
# Qwen3-0.6B's proportions (heads 2 x hidden wide, ffn 3 x hidden, QK norms): attention's transients are the larger.
QWEN3_WIDE = replace(
    LLAMA, kv_channels=32, num_query_groups=4, ffn_hidden_size=3 * LLAMA.hidden_size, qk_layernorm=True
)
WIDE = replace(LLAMA, kv_channels=64)  # heads 4 x hidden wide: attention's transients are the larger in scoring too


def _tokens(rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, LLAMA.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("model", "rows", "positions", "answer", "prefill_tokens"),
    [
        (LLAMA, 4, 200, 50, 8192),
        (LLAMA, 8, 120, 90, 64),
        (LLAMA, 1, 256, 4, 100),
        (NEMOTRON, 4, 200, 50, 8192),
        (NEMOTRON, 8, 120, 90, 64),
        (QWEN3_WIDE, 4, 200, 50, 8192),
        (WIDE, 8, 120, 90, 8192),
    ],
    ids=[
        "llama-whole",
        "llama-chunks-64",
        "llama-chunks-100",
        "nemotron-whole",
        "nemotron-chunks-64",
        "qwen3-wide-whole",
        "wide-whole",
    ],
)
def test_kv_cache_and_prefill_match_the_lean_decoder(
    layout, model: ModelConfig, rows: int, positions: int, answer: int, prefill_tokens: int
) -> None:
    """The cache is the estimate's to the byte; the prefill's peak beside it (every row's prompt at once, or a
    chunk of `prefill_tokens` tokens at a time) is the estimate's transient within 5 %; a decode step's stays
    below it."""
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=1)[0].eval()
    decoder = LeanDecoder(chunk, layout, model.max_position_embeddings, prefill_tokens=prefill_tokens)
    workload = Workload(Role.generates, "checkpoint", "-", rows, positions, answer, prefill_tokens=prefill_tokens)
    estimate = held_model(model, SINGLE, workload, DType.fp32, cuda=False)
    with runtime.inference(), PeakMeter() as meter:
        logits, _ = decoder.add(_tokens(rows, workload.prompt).tolist(), positions)
        cache = sum(keys.nbytes + values.nbytes for keys, values in decoder.cache)
        prefill = meter.peak - cache
        meter.reset_peak()
        for _ in range(3):
            logits = decoder.step(logits.argmax(-1))
        step = meter.peak - meter.current
    assert cache == estimate.cache == kv_cache_bytes(model, SINGLE, rows, positions, 4)
    assert estimate.weights == 4 * sum(p.numel() for p in chunk.parameters())
    assert estimate.working == pytest.approx(prefill, rel=0.05)
    assert step < estimate.working


@pytest.mark.parametrize(
    "model", [LLAMA, NEMOTRON, QWEN3, QWEN3_WIDE, WIDE], ids=["llama", "nemotron", "qwen3", "qwen3-wide", "wide"]
)
def test_scoring_forward_matches_an_apm(layout, model: ModelConfig) -> None:
    """An APM's forward through megatron's layers (annotation, evaluation, the server's scoring): the transient is
    the estimate's within 5 %."""
    chunk = build_attribute_model_chunks(model, PrecisionConfig(), layout, seed=1, num_attributes=9)[0].eval()
    rows, length = 4, 200
    workload = Workload(Role.scores, "apm_checkpoint", "-", rows, length)
    tokens = _tokens(rows, length)
    with runtime.inference(), PeakMeter() as meter:
        chunk(tokens, torch.arange(length).expand(rows, length), None)
    assert held_model(model, SINGLE, workload, DType.fp32, cuda=False).working == pytest.approx(meter.peak, rel=0.05)


def test_tensor_and_pipeline_parallel_split_weights_and_cache() -> None:
    model = replace(LLAMA, num_attention_heads=8, num_query_groups=4)
    workload = Workload(Role.generates, "checkpoint", "-", 2, 100, 10)
    one = held_model(model, SINGLE, workload, DType.bf16)
    split = held_model(
        model, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), workload, DType.bf16
    )
    assert split.cache == one.cache / 4  # half the layers, half the key/value heads
    layer_and_vocab = model.padded_vocab_size * model.hidden_size
    assert split.parameters < one.parameters / 2 and split.parameters > (one.parameters - layer_and_vocab) / 4


def test_on_cuda_a_chunked_prefill_tiles_the_mask_or_repeats_the_heads() -> None:
    """CUDA's kernel for masked attention takes no grouped key/value heads: a prefill chunk after the first tiles its
    mask over a group's query heads or repeats one layer's keys and values, whichever holds less; the CPU kernel
    takes the groups. A prefill in one forward has no mask, so nothing changes."""
    chunked = Workload(Role.generates, "checkpoint", "-", 8, 120, 90, prefill_tokens=64)  # 8 positions a chunk
    cpu, cuda = (held_model(LLAMA, SINGLE, chunked, DType.bf16, cuda=gpu) for gpu in (False, True))
    mask = 8 * 120  # a chunk's [positions, keys] booleans
    assert cuda.working == cpu.working + LLAMA.num_attention_heads // LLAMA.num_query_groups * mask
    assert cuda.cache == cpu.cache
    long = Workload(Role.generates, "checkpoint", "-", 1, 256, 4, prefill_tokens=200)  # 200 positions of one row
    repeated = 2 * LLAMA.num_attention_heads * 256 * LLAMA.head_dim * 2  # keys and values of every head, bf16
    difference = (
        held_model(LLAMA, SINGLE, long, DType.bf16).working
        - held_model(LLAMA, SINGLE, long, DType.bf16, cuda=False).working
    )
    assert difference == repeated  # the tiled mask (4 x 200 x 256) would hold more
    whole = Workload(Role.generates, "checkpoint", "-", 8, 120, 90)
    assert (
        held_model(LLAMA, SINGLE, whole, DType.bf16).working
        == held_model(LLAMA, SINGLE, whole, DType.bf16, cuda=False).working
    )


def _checkpoint(root: Path, name: str, overrides: list[str]) -> Path:
    """A run directory as training leaves it, as far as a dry run reads it: checkpoints/latest naming a checkpoint
    with its saved config (no weights)."""
    step = root / name / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    (step / "steerlm_checkpoint.json").write_text("{}")
    save_resolved(compose("train_sft", overrides), step / "config.yaml")
    (step.parent / "latest").write_text("step_10\n")
    return root / name


def test_dry_run_of_a_server_sizes_its_models_from_their_checkpoints(tmp_path, capsys) -> None:
    sft = _checkpoint(tmp_path, "sft", ["model=llama3_70b", "precision=bf16"])
    apm = _checkpoint(tmp_path, "apm", ["model=llama3_70b", "precision=fp32"])
    argv = ["serve", f"checkpoint={sft}", f"apm_checkpoint={apm}", "parallel=tp8", "parallel.sequence_parallel=false"]
    assert main([*argv, "precision=bf16", "cluster=slurm", "cluster.gpus_per_node=8", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and "memory per GPU" not in out
    # 80 layers x 16 rows (limits.max_batch_size) x 8192 positions x 1 of 8 key/value heads x 128 x 2 (K, V) x 2 bytes
    assert "memory per GPU while serving" in err and "KV cache 5.0 (16 rows x 8192 positions)" in err
    assert "weights 15.9 GiB" in err and "weights 31.9 GiB" in err  # the SFT model in bf16, the APM as it trained
    # the prefill in chunks of limits.prefill_tokens=8192 tokens (16 rows x 512 positions), with a chunk's mask
    # tiled over the 8 query heads of each key/value head (33 MB: less than the 0.5 GiB of repeated heads)
    assert "its largest transient 0.5 (16 rows x 512 positions at once)" in err


def test_dry_run_names_what_it_cannot_size(tmp_path, capsys) -> None:
    """A checkpoint not written yet, or a .nemo archive, is named with the reason; the rest is sized."""
    sft = _checkpoint(tmp_path, "sft", ["model=tiny"])
    (tmp_path / "empty").mkdir()
    nemo = tmp_path / "judge.nemo"
    with tarfile.open(nemo, "w"):
        pass
    argv = ["annotate", f"apm_checkpoint={tmp_path / 'empty'}", f"input={sft / 'checkpoints' / 'latest'}"]
    assert main([*argv, f"judge.checkpoint={nemo}", "judge.attributes=[correctness]", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"apm_checkpoint={tmp_path / 'empty'}: not written yet" in err
    assert f"judge.checkpoint={nemo}: a .nemo archive" in err and "for the models sized" in err
    saved = sft / "checkpoints" / "step_10" / "config.yaml"
    saved.write_text("model: [unclosed\n")  # a garbled config is named, not a traceback
    assert main(["evaluate_attribute_model", f"apm_checkpoint={sft}", f"input={saved}", "--dry-run"]) == 0
    assert f"apm_checkpoint={sft}: {saved} cannot be read (" in capsys.readouterr().err


@pytest.mark.parametrize("vocabulary", [300, 8000])
def test_log_probability_forward_matches_a_language_model(layout, vocabulary: int) -> None:
    """A language model's forward with labels (SteerLM 2.0's log Q' and log P(y|x)): the layers' transient, or with
    a large vocabulary the loss's, within 5 %."""
    model = replace(LLAMA, vocab_size=vocabulary)
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=1)[0].eval()
    rows, length = 4, 200
    tokens = torch.randint(0, vocabulary, (rows, length), generator=torch.Generator().manual_seed(0))
    with runtime.inference(), PeakMeter() as meter:
        chunk(tokens, torch.arange(length).expand(rows, length), None, labels=tokens)
    workload = Workload(Role.log_probabilities, "plain_sft_checkpoint", "-", rows, length)
    assert held_model(model, SINGLE, workload, DType.fp32, cuda=False).working == pytest.approx(meter.peak, rel=0.05)
