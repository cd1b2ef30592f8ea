"""Shared test fixtures: a one-rank runtime and the small model the single-process tests build."""

from __future__ import annotations

import pytest

from steerlm import runtime
from steerlm.config import ModelConfig, ParallelConfig

# Two layers, GQA (4 heads, 2 groups), a vocabulary that needs padding (300 → 384).
TEST_MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                         vocab_size=300, max_position_embeddings=128)


@pytest.fixture(scope="module")
def layout():
    """A world of one (gloo on CPU, nccl on GPU), torn down after the module."""
    layout = runtime.initialize(ParallelConfig(), seed=0)
    yield layout
    runtime.shutdown()
