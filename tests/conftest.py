"""Shared test fixtures: a one-rank runtime and the small model the single-process tests build."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from steerlm import runtime
from steerlm.config import Activation, ModelConfig, Normalization, ParallelConfig
from steerlm.runtime import mkl

# Before anything multiplies a matrix (MKL reads it once): the strict mode `runtime.initialize` gives recipes,
# so tests compute what recipes compute and in-process initialisations do not warn.
os.environ.setdefault(mkl.VARIABLE, mkl.STRICT)

# Two layers, GQA (4 heads, 2 groups), a vocabulary that needs padding (300 → 384).
TEST_MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=300,
    max_position_embeddings=128,
)


def as_nemotron(model: ModelConfig) -> ModelConfig:
    """`model`'s shape with the layers NVIDIA's Nemotron models are built from (NeMo's `layernorm1p`): LayerNorm
    weights stored centred on zero, a squared-ReLU MLP, RoPE on half of each head's channels."""
    return replace(
        model,
        normalization=Normalization.LayerNorm,
        layernorm_zero_centered_gamma=True,
        activation=Activation.squared_relu,
        rotary_percent=0.5,
    )


NEMOTRON_MODEL = as_nemotron(TEST_MODEL)
# Gemma's: a GELU-gated MLP, zero-centred RMSNorm weights, scaled input embeddings, tied, heads wider than
# hidden / heads
GEMMA_MODEL = replace(
    TEST_MODEL,
    activation=Activation.geglu,
    layernorm_zero_centered_gamma=True,
    apply_embedding_scaling=True,
    share_embeddings_and_output_weights=True,
    kv_channels=32,
    layernorm_epsilon=1e-6,
)
# Gemma 2's: Gemma's with norms of each sublayer's output, an attention scale other than the head's channels' and caps
# at the scale of a tiny random model's attention scores (~0.07) and logits (~0.3), so that both bite
GEMMA2_MODEL = replace(
    GEMMA_MODEL,
    post_sublayer_norms=True,
    attn_logit_softcapping=0.05,
    final_logit_softcapping=0.1,
    query_pre_attn_scalar=24,
)
# Gemma 3's: Gemma 2's without caps, with norms of each query and key head and a window of 6 positions on the first of
# its two layers (Gemma 3's slide on five of six), which rotates with plain RoPE of its own base, the other with linear
# scaling (Gemma-3-4B+'s, x8 there)
GEMMA3_MODEL = replace(
    GEMMA2_MODEL,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    qk_layernorm=True,
    sliding_window=6,
    window_attn_skip_freq=2,
    rope_local_base_freq=100,
    rope_linear_factor=4.0,
)
# Qwen2's layers: a Llama's with biases on the query, key and value projections (RoPE base, norm epsilon: Qwen2.5's).
QWEN2_MODEL = replace(TEST_MODEL, add_qkv_bias=True, rotary_base=1000000, layernorm_epsilon=1e-6)
# Qwen3's: a norm of each query and key head, heads wider than hidden / heads (Qwen3-0.6B: 1024 / 16 = 64 < 128).
QWEN3_MODEL = replace(TEST_MODEL, qk_layernorm=True, kv_channels=32, rotary_base=1000000, layernorm_epsilon=1e-6)
# A Llama's layers with RoPE on half of each head: only Phi-3 expresses it (Phi3ForCausalLM; Phi-4-mini's: 0.75).
PHI3_MODEL = replace(TEST_MODEL, rotary_percent=0.5)


def randomize_biases(chunks, layout, seed: int = 3, std: float = 0.1) -> None:
    """Every linear layer's bias drawn per global name at its full shape and sliced for this TP rank, so a layout
    holds the values every other holds (steerlm's initialisation zeroes biases, which would hide one a code path
    forgets)."""
    import torch

    from steerlm.models.init import parameter_seed
    from steerlm.models.sharding import full_shape, global_name, shard

    for chunk in chunks:
        for local, param in chunk.named_parameters():
            if ".linear_" in local and local.endswith(".bias"):
                name = global_name(local, chunk)
                generator = torch.Generator().manual_seed(parameter_seed(seed, name))
                full = torch.empty(full_shape(param, layout.tp)).normal_(0.0, std, generator=generator)
                with torch.no_grad():
                    param.copy_(shard(full, param, layout.tp_rank, layout.tp))


# Under `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make test) whole files go to the workers in this order:
# the longest first, the shared steering SFT run (`steerable`) built by one worker while the other trains the
# generative APM, so neither waits on the file lock and the run does not end on one long file.
LONGEST_FIRST = (
    "test_steering.py",
    "test_generative_apm.py",
    "test_chat.py",
    "test_pipeline.py",
    "test_checkpoint_resume.py",
    "test_server.py",
    "test_steerlm2.py",
    "test_sft.py",
    "test_annotate.py",
    "test_faults.py",
    "test_attribute_model.py",
    "test_convert.py",
    "test_lora.py",
    "test_lora_checkpoints.py",
    "test_nemo_import.py",
    "test_launchers.py",
    "test_parallel_parity.py",
    "test_demo_recipe.py",
    "test_evaluate_apm.py",
    "test_gpu_suite.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n N` each worker computes with one thread, as the recipes it launches do (recipe_runner
    sets OMP_NUM_THREADS=1): N workers with torch's default of a thread per core oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # processes the tests start themselves (gloo groups, servers)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of LONGEST_FIRST first, in its order; the rest after them as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="module")
def layout():
    """A world of one (gloo on CPU, nccl on GPU), torn down after the module."""
    layout = runtime.initialize(ParallelConfig(), seed=0)
    yield layout
    runtime.shutdown()


@pytest.fixture(scope="session")
def steerable(tmp_path_factory) -> dict:
    """An attribute-conditioned SFT run of the tiny model on the synthetic world with the shipped recipe (400
    steps): enough to follow requested humor, toxicity and verbosity. Shared by the steering, chat, server and
    SteerLM 2.0 tests: `data` (the world, its tokenizer, 40 eval prompts) and `sft` (the run). Under `pytest -n`
    the workers share one run: the first builds it under a file lock, the others wait and reuse it."""
    from filelock import FileLock

    from tests.recipe_runner import run_recipe

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # each worker's base directory lies in the run's one directory
    root = shared / "steerable"
    data, sft = root / "synthetic", root / "sft"
    with FileLock(str(shared / "steerable.lock")):
        if not (root / "built").exists():
            made = run_recipe(
                "prepare_data",
                ["data=synthetic", f"output={data}", "synthetic.unlabelled_rows=10", "synthetic.eval_prompts=40"],
            )
            assert made.returncode == 0, made.stderr[-2000:]
            trained = run_recipe(
                "train_sft",
                [
                    f"data.train_file={data}/annotated.jsonl",
                    f"tokenizer.path={data}/tokenizer",
                    f"output_dir={sft}",
                    "trainer.eval_interval=null",
                    "checkpoint.save_interval=null",
                ],
                timeout=900,
            )
            assert trained.returncode == 0, trained.stderr[-2000:]
            (root / "built").touch()
    return {"data": data, "sft": sft}
