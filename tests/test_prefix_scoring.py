"""Shared-prefix scoring (steerlm/inference/prefix_scoring.py) on a random model: each group's prefix once, the
continuations on its cache, give every sequence's log-probability as megatron's forward of it whole does, at TP=1,
TP=2 and PP=2. The Bayes judge's use of it on a trained model: tests/test_judge.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from steerlm import runtime
from steerlm.config import ParallelConfig, PrecisionConfig
from steerlm.data.collate import Example, pad_batch
from steerlm.inference.decoders import LeanDecoder
from steerlm.inference.prefix_scoring import common_prefix, grouped_log_probs
from steerlm.models.gpt import build_model_chunks
from steerlm.training import SEQUENCE_LOG_PROB, predict
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed


def _groups() -> list[list[Example]]:
    """Groups of variants sharing prefixes of different lengths (0 included), continuations of different lengths,
    trained targets in the continuation only, and one group whose prefix holds trained targets too."""
    rng = random.Random(0)
    groups = []
    for prefix_length, size in ((12, 5), (3, 4), (0, 3), (30, 2), (7, 1)):
        prefix = [2, *(rng.randrange(4, 200) for _ in range(max(prefix_length - 1, 0)))][:prefix_length]
        group = []
        for _ in range(size):
            tail = [rng.randrange(4, 200) for _ in range(rng.randrange(2, 25))]
            ids = tuple(prefix + tail) if prefix else tuple([rng.randrange(4, 200), *tail])
            trained = tuple(i >= max(prefix_length, 1) + 1 for i in range(len(ids)))
            group.append(Example(ids, trained))
        groups.append(group)
    anywhere = [Example(tuple(range(2, 40)), tuple(i % 3 == 0 for i in range(38))) for _ in range(2)]
    anywhere[1] = Example(anywhere[1].ids[:-1] + (7,), anywhere[1].trainable)
    return [*groups, anywhere]


def _scores(tp: int, pp: int = 1) -> dict:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = runtime.initialize(parallel, seed=0)
    try:
        model = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=7)[0]
        model.eval()
        groups = _groups()
        decoder = LeanDecoder(model, layout, TEST_MODEL.max_position_embeddings)
        with runtime.inference():
            shared = grouped_log_probs(decoder, groups)
        whole = [predict([model], [pad_batch(group, 0)], layout, SEQUENCE_LOG_PROB)[0].tolist() for group in groups]
        return {"shared": shared, "whole": whole, "prefixes": [common_prefix(group) for group in groups]}
    finally:
        runtime.shutdown()


def _flat(rows: list[list[float]]) -> np.ndarray:
    return np.array([value for row in rows for value in row])


@pytest.mark.slow
def test_shared_prefix_log_probs_equal_whole_sequences_at_tp1_tp2_and_pp2() -> None:
    tp1 = run_distributed(_scores, 1, 1)[0]
    tp2 = run_distributed(_scores, 2, 2)
    pp2 = run_distributed(_scores, 2, 1, 2)
    assert pp2[0]["shared"] == pp2[1]["shared"], "both stages hold the same figures (the last stage's logits)"
    np.testing.assert_allclose(_flat(pp2[0]["shared"]), _flat(tp1["shared"]), rtol=1e-5)
    prefixes = tp1["prefixes"]
    assert prefixes[:4] == [12, 3, 0, 30] and prefixes[5] == 37 and prefixes[4] == len(_groups()[4][0].ids)
    np.testing.assert_allclose(_flat(tp1["shared"]), _flat(tp1["whole"]), rtol=1e-5)
    assert tp2[0]["shared"] == tp2[1]["shared"], "both tensor-parallel ranks hold the same figures"
    np.testing.assert_allclose(_flat(tp2[0]["shared"]), _flat(tp1["shared"]), rtol=1e-5)
    np.testing.assert_allclose(_flat(tp2[0]["whole"]), _flat(tp1["whole"]), rtol=1e-5)
