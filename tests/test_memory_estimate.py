"""The per-GPU memory estimate (`launchers.memory`) against what a real model holds: its parameter count, and the
bytes autograd keeps for the backward (counted with saved-tensor hooks on a forward); and how `python -m
launchers … --dry-run` reports it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from launchers.cli import main
from launchers.memory import GIB, checkpoint_bytes, estimate_memory, preset_table, weights_bytes
from steerlm.config import (
    Activation,
    CrossEntropy,
    DType,
    LoraConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
    TrainerConfig,
    compose,
    to_typed,
)
from steerlm.models.gpt import build_model_chunks
from tests.conftest import TEST_MODEL, as_nemotron

WIDER = replace(TEST_MODEL, num_layers=3, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8)


def _saved_bytes(chunk: torch.nn.Module, rows: int, length: int) -> int:
    """Bytes of the distinct storages autograd saves in a training forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, TEST_MODEL.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(tokens, torch.arange(length).expand(rows, length), None, labels=tokens)
    return sum(saved.values())


@pytest.mark.parametrize(
    "model",
    [
        TEST_MODEL,
        WIDER,
        replace(WIDER, cross_entropy=CrossEntropy.megatron),
        as_nemotron(WIDER),  # Nemotron's layers: LayerNorm, squared ReLU, RoPE on half of each head
        replace(WIDER, add_qkv_bias=True),  # Qwen2's
        replace(WIDER, qk_layernorm=True),  # Qwen3's
        replace(  # Gemma's: GeGLU, zero-centred RMSNorm, scaled embeddings, heads wider than hidden / heads
            WIDER,
            activation=Activation.geglu,
            layernorm_zero_centered_gamma=True,
            apply_embedding_scaling=True,
            kv_channels=64,
        ),
        replace(  # Gemma 2's: Gemma's with norms of each sublayer's output and soft-capped scores (kept per head)
            WIDER,
            activation=Activation.geglu,
            layernorm_zero_centered_gamma=True,
            apply_embedding_scaling=True,
            kv_channels=64,
            post_sublayer_norms=True,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        replace(WIDER, sliding_window=16),  # a boolean mask: SDPA's fused kernel keeps no scores either
    ],
    ids=["tiny", "wider", "megatron-loss", "nemotron", "qwen2", "qwen3", "gemma", "gemma2", "window"],
)
def test_activations_and_parameters_match_a_real_forward(layout, model) -> None:
    rows, length = 2, 64
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=1)[0]
    cfg = TrainConfig(
        model=model, trainer=TrainerConfig(micro_batch_size=rows, global_batch_size=rows, seq_length=length)
    )
    estimate = estimate_memory(cfg, data_parallel_size=1)
    assert estimate.parameters == sum(p.numel() for p in chunk.parameters()) == model.num_parameters(padded=True)
    measured = _saved_bytes(chunk, rows, length)
    if model.cross_entropy == CrossEntropy.megatron:  # its fp32 softmax is the 4-byte vocabulary term
        assert estimate.activations == pytest.approx(measured, rel=0.15)
    else:
        assert estimate.activations == pytest.approx(measured, rel=0.05)


def test_bytes_per_parameter_and_distributed_optimizer_sharding() -> None:
    bf16 = TrainConfig(precision=PrecisionConfig(dtype=DType.bf16))
    plain = estimate_memory(bf16, data_parallel_size=4)
    assert (plain.weights, plain.gradients, plain.optimizer) == (
        2 * plain.parameters,
        4 * plain.parameters,
        12 * plain.parameters,  # fp32 master weights + two Adam moments
    )
    sharded = estimate_memory(replace(bf16, parallel=ParallelConfig(use_distributed_optimizer=True)), 4)
    assert sharded.optimizer == plain.optimizer / 4 and sharded.weights == plain.weights
    fp32 = estimate_memory(TrainConfig(), data_parallel_size=1)
    assert fp32.optimizer == 8 * fp32.parameters  # fp32 weights are the master weights


@pytest.mark.parametrize("tp", [1, 2])
def test_lora_counts_the_adapters_a_rank_holds_and_trains_only_them(layout, tp: int) -> None:
    """With adapters, weights are the base plus the adapters (as a real adapted model holds them, at TP=1; at TP=2
    each rank holds the split matrices' halves and the replicated ones whole), and only the adapters have
    gradients and optimizer state."""
    from steerlm.models import lora

    adapters = LoraConfig(rank=4, targets=["linear_qkv", "linear_fc2"])
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1)[0]
    lora.attach([chunk], adapters, seed=1)
    shapes = {n: p.shape for n, p in chunk.named_parameters() if lora.is_adapter(n)}
    held = sum(
        shape.numel() // (tp if (n.endswith("linear_qkv.lora_b") or n.endswith("linear_fc2.lora_a")) else 1)
        for n, shape in shapes.items()
    )
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    plain = estimate_memory(TrainConfig(model=TEST_MODEL, parallel=parallel), data_parallel_size=1)
    adapted = estimate_memory(TrainConfig(model=TEST_MODEL, parallel=parallel, lora=adapters), data_parallel_size=1)
    assert adapted.parameters == plain.parameters + held
    assert (adapted.gradients, adapted.optimizer) == (4 * held, 8 * held)
    if tp == 1:
        assert adapted.parameters == sum(p.numel() for p in chunk.parameters())


def test_pipeline_stages_split_the_parameters_and_the_first_holds_pp_micro_batches() -> None:
    cfg = to_typed(compose("demo", ["model=llama3_70b", "parallel=tp8_pp2", "precision=bf16"]))
    cfg = replace(cfg, trainer=TrainerConfig(micro_batch_size=1, global_batch_size=16, seq_length=4096))
    estimate = estimate_memory(cfg, data_parallel_size=2)
    total = cfg.model.num_parameters(padded=True)
    vocab = cfg.model.padded_vocab_size * cfg.model.hidden_size
    assert estimate.parameters == pytest.approx((total - vocab) / 16 + vocab / 8 / 2, rel=0.01)
    assert estimate.in_flight == 2
    assert 60 * GIB < estimate.total < 100 * GIB


def test_dry_run_reports_the_estimate_on_stderr(capsys) -> None:
    argv = ["demo", "model=llama3_70b", "parallel=tp8_pp2", "parallel.data_parallel_size=2", "precision=bf16"]
    assert main([*argv, "cluster=slurm_pyxis", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and "memory per GPU" not in out
    cfg = to_typed(compose("demo", ["model=llama3_70b", "parallel=tp8_pp2", "precision=bf16"]))
    expected = estimate_memory(replace(cfg, parallel=replace(cfg.parallel, data_parallel_size=2)), 2)
    assert f"= {expected.total / GIB:.1f} GiB" in err and "4.41B parameters" in err


@pytest.mark.parametrize("dtype", [DType.fp32, DType.bf16])
def test_checkpoint_bytes_match_real_checkpoints_full_and_adapters_alone(layout, tmp_path, dtype: DType) -> None:
    """A LoRA run from a base, saved with `lora.checkpoint=full` and with `adapters`, and its weights alone written
    by `to=steerlm`: the bytes on disk are the estimates' (within 5 %: the index files and per-tensor metadata)."""
    from steerlm.checkpoint.sharded import WeightsOnly, resolve_checkpoint, save_checkpoint
    from steerlm.config.convert import ConvertConfig, ModelFormat
    from steerlm.stages.convert import convert
    from steerlm.training import build_training
    from steerlm.training.init_from import resolve_init_source, resume_or_initialise

    model = replace(WIDER, hidden_size=256, ffn_hidden_size=704, vocab_size=2048)
    cfg = TrainConfig(model=model, precision=PrecisionConfig(dtype=dtype), lora=LoraConfig(rank=64, alpha=64.0))
    base = build_model_chunks(model, cfg.precision, layout, seed=1)
    save_checkpoint(tmp_path / "base", 0, WeightsOnly(base), layout, cfg)
    setup = build_training(cfg, layout)
    resume_or_initialise(
        cfg, tmp_path, setup, layout, resolve_init_source("sft.init_from", str(tmp_path / "base"), model)
    )
    setup.model[0].zero_grad_buffer()
    setup.optimizer.step()  # Adam's state exists
    on_disk = {}
    for kind, base_weights in (("adapters", setup.base), ("full", None)):
        path = save_checkpoint(tmp_path / kind, 1, replace(setup, base=base_weights), layout, cfg)
        on_disk[kind] = sum(file.stat().st_size for file in path.iterdir())
    assert on_disk["adapters"] == pytest.approx(checkpoint_bytes(cfg, has_init_from=True), rel=0.05)
    assert on_disk["full"] == pytest.approx(checkpoint_bytes(cfg, has_init_from=False), rel=0.05)
    convert(ConvertConfig(str(tmp_path / "adapters"), str(tmp_path / "alone"), ModelFormat.steerlm), layout)
    written = resolve_checkpoint(tmp_path / "alone")
    assert sum(file.stat().st_size for file in written.iterdir()) == pytest.approx(weights_bytes(cfg), rel=0.05)


def test_dry_run_reports_one_checkpoint_s_size(capsys) -> None:
    """With an init_from, `auto` saves a LoRA run's adapters alone; without one, everything."""
    argv = ["train_sft", "model=llama3_70b", "parallel=tp8_pp2", "precision=bf16", "lora.rank=16"]
    assert main([*argv, "sft.init_from=/models/llama3_70b", "--dry-run"]) == 0
    alone = capsys.readouterr().err
    assert main([*argv, "--dry-run"]) == 0
    whole = capsys.readouterr().err
    assert "one checkpoint on disk (estimate): 2.29 GiB, LoRA adapters alone" in alone
    assert "one checkpoint on disk (estimate): 129.82 GiB, weights and optimizer state" in whole
    assert "the weights alone (recipes/convert.py to=steerlm): 127.53 GiB" in alone


def test_preset_table_covers_every_model_preset() -> None:
    table = preset_table()
    presets = sorted(path.stem for path in (Path(__file__).parents[1] / "steerlm/conf/model").glob("*.yaml"))
    assert len(presets) >= 15
    for preset in presets:
        assert f"| `{preset}` |" in table
