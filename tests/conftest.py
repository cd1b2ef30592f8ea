"""Shared test fixtures: a one-rank runtime and the small model the single-process tests build."""

from __future__ import annotations

import pytest

from steerlm import runtime
from steerlm.config import ModelConfig, ParallelConfig

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


@pytest.fixture(scope="module")
def layout():
    """A world of one (gloo on CPU, nccl on GPU), torn down after the module."""
    layout = runtime.initialize(ParallelConfig(), seed=0)
    yield layout
    runtime.shutdown()


@pytest.fixture(scope="session")
def steerable(tmp_path_factory) -> dict:
    """An attribute-conditioned SFT run of the tiny model on the synthetic world with the shipped recipe
    (400 steps, ~1.5 minutes on 2 cores): enough to follow requested humor, toxicity and verbosity. Shared by
    the steering, chat and server tests: `data` (the world, its tokenizer, 40 eval prompts) and `sft` (the run)."""
    from tests.recipe_runner import run_recipe

    root = tmp_path_factory.mktemp("steerable")
    data, sft = root / "synthetic", root / "sft"
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
    return {"data": data, "sft": sft}
