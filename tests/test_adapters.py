"""Several LoRA adapters served at once on one model: two adapters-only checkpoints of different ranks and targets,
loaded into one `AdapterBank`, give each row of a mixed batch the logits of its own adapter's merged model (prefill,
steps, rows leaving and joining), at TP=1 and TP=2, and the generator's greedy tokens; checkpoints that are not
adapters alone on the served checkpoint are refused naming the profile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, load_weights, save_checkpoint
from steerlm.checkpoint.sources import BaseWeights, WeightFormat
from steerlm.config import LoraConfig, ParallelConfig, PrecisionConfig, TrainConfig
from steerlm.config.lora import LoraCheckpoint
from steerlm.errors import ConfigError
from steerlm.inference.adapters import check_adapters, load_adapter_bank
from steerlm.inference.decoders import LeanDecoder
from steerlm.inference.generate import Decoding, Generator, RowRequest, SamplingParams
from steerlm.models import build_model_chunks, lora
from steerlm.models.sharding import named_global_parameters
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed

ADAPTERS = {
    "narrow": LoraConfig(rank=2, alpha=4.0, targets=["linear_qkv", "linear_fc1"]),
    "wide": LoraConfig(rank=4, alpha=8.0),
}
PROMPTS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25], [2, 30], [2, 40, 41, 42, 43, 44]]
ROWS = [0, 1, 2, 1]  # each prompt's adapter: 0 the served model, 1 narrow, 2 wide
LENGTH = 32
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _write(root: Path, layout) -> dict[str, Path]:
    """The base checkpoint and each adapter's checkpoint of its adapters alone (random A and B) on it."""
    config = TrainConfig(model=TEST_MODEL)
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1)
    paths = {"base": save_checkpoint(root / "base", 0, WeightsOnly(chunks), layout, config)}
    base = BaseWeights.of(WeightFormat.steerlm, paths["base"])
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1)
        lora.attach(chunks, cfg, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in chunks[0].named_parameters():
                if lora.is_adapter(param_name):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        saved = WeightsOnly(chunks, base=base)
        paths[name] = save_checkpoint(root / name, 0, saved, layout, replace(config, lora=cfg))
    return paths


def _model(path: Path, layout, seed: int) -> torch.nn.Module:
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=seed)
    load_weights(path, chunks, layout, TEST_MODEL)
    return chunks[0]


def _mixed_logits(paths: dict, layout) -> list[torch.Tensor]:
    """Logits of the mixed batch through the bank: the prefill, a step, a step after row 1 left, and a step after
    a row of adapter 2 joined."""
    served = _model(paths["base"], layout, seed=7)
    before = {name: param.clone() for name, param in named_global_parameters([served])}
    profiles = {"a": str(paths["narrow"]), "b": str(paths["wide"]), "c": str(paths["narrow"])}
    bank, index = load_adapter_bank(
        check_adapters(profiles, paths["base"], TEST_MODEL), [served], layout, TEST_MODEL, True
    )
    assert index == {"a": 1, "b": 2, "c": 1} and lora.config_of(served) is None
    assert all(torch.equal(param, before[name]) for name, param in named_global_parameters([served]))
    decoder = LeanDecoder(served, layout, LENGTH, bank)
    out = [decoder.add(PROMPTS, LENGTH, (), ROWS)[0]]
    out.append(decoder.step(torch.tensor([5, 6, 7, 8], device=layout.device)))
    decoder.keep([0, 2, 3])
    out.append(decoder.step(torch.tensor([9, 10, 11], device=layout.device)))
    out.append(decoder.add([[2, 50, 51]], LENGTH, (), [2])[0])
    out.append(decoder.step(torch.tensor([12, 13, 14, 15], device=layout.device)))
    return [logits.cpu() for logits in out]


def _reference_logits(paths: dict, layout) -> list[torch.Tensor]:
    """The same steps, each row through its own adapter's merged model alone (on CPU, as `_mixed_logits`)."""
    models = {
        0: _model(paths["base"], layout, 3),
        1: _model(paths["narrow"], layout, 4),
        2: _model(paths["wide"], layout, 5),
    }
    decoders = []
    first = []
    for prompt, adapter in zip(PROMPTS, ROWS):
        decoder = LeanDecoder(models[adapter], layout, LENGTH)
        first.append(decoder.add([prompt], LENGTH)[0][0])
        decoders.append(decoder)

    def steps(tokens: list[int]) -> torch.Tensor:
        return torch.stack([d.step(torch.tensor([t], device=layout.device))[0] for d, t in zip(decoders, tokens)])

    out = [torch.stack(first), steps([5, 6, 7, 8])]
    decoders = [decoders[0], decoders[2], decoders[3]]
    out.append(steps([9, 10, 11]))
    joined = LeanDecoder(models[2], layout, LENGTH)
    out.append(joined.add([[2, 50, 51]], LENGTH)[0])
    decoders.append(joined)
    out.append(steps([12, 13, 14, 15]))
    return [logits.cpu() for logits in out]


@pytest.fixture(scope="module")
def paths(layout, tmp_path_factory) -> dict[str, Path]:
    return _write(tmp_path_factory.mktemp("adapters"), layout)


@pytest.mark.gpu  # and on CPU: the GPU suite runs it on CUDA
def test_each_row_gets_its_own_adapters_merged_model(layout, paths) -> None:
    for got, expected in zip(_mixed_logits(paths, layout), _reference_logits(paths, layout)):
        torch.testing.assert_close(got, expected, **TOLERANCE)


def _mixed_logits_at(paths: dict, tp: int, pp: int) -> list[torch.Tensor]:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = runtime.initialize(parallel, seed=0)
    try:
        return _mixed_logits(paths, layout)
    finally:
        runtime.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_adapters_at_tp2_and_pp2_give_the_logits_of_tp1(layout, paths, tp: int, pp: int) -> None:
    """TP=2: column layers' B and row layers' A split over two ranks; a row layer's partial update joins its
    partial sum before the reduction. PP=2: each stage runs its own layers' adapters."""
    expected = _reference_logits(paths, layout)
    for rank in run_distributed(_mixed_logits_at, 2, paths, tp, pp):
        for got, reference in zip(rank, expected):
            torch.testing.assert_close(got, reference, **TOLERANCE)


def test_the_generator_decodes_each_row_with_its_adapter(layout, paths) -> None:
    from tests.test_generate import TOKENIZER

    served = _model(paths["base"], layout, seed=7)
    bank, _ = load_adapter_bank(
        check_adapters({"b": str(paths["wide"])}, paths["base"], TEST_MODEL), [served], layout, TEST_MODEL, True
    )
    params = SamplingParams(max_new_tokens=6)
    generator = Generator([served], TOKENIZER, layout, LENGTH, (), adapters=bank)
    decoding = Decoding(generator, track_text=False)
    outcome = decoding.advance([RowRequest(0, PROMPTS[0], params, 1), RowRequest(1, PROMPTS[0], params, 0)])
    rows = {}
    while True:
        rows.update((row.index, row.completion(TOKENIZER).token_ids) for row in outcome.finished)
        if not decoding.rows:
            break
        outcome = decoding.advance()
    for key, path in ((0, paths["wide"]), (1, paths["base"])):
        alone = Generator([_model(path, layout, seed=2)], TOKENIZER, layout, LENGTH, ())
        assert rows[key] == alone.generate([PROMPTS[0]], [params])[0].token_ids
    assert rows[0] != rows[1]  # the adapter changed the answer
    failed = decoding.advance([RowRequest(2, PROMPTS[0], params, 2)]).failed
    assert failed and "adapter 2 is not loaded" in str(failed[0][1])  # the row fails alone, at its prefill


def test_checkpoints_that_are_not_adapters_alone_on_the_served_model_are_refused(layout, paths, tmp_path) -> None:
    config = replace(TrainConfig(model=TEST_MODEL), lora=replace(ADAPTERS["wide"], checkpoint=LoraCheckpoint.full))
    chunks = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1)
    lora.attach(chunks, config.lora, seed=0)
    full = save_checkpoint(tmp_path / "full", 0, WeightsOnly(chunks), layout, config)
    other = _write(tmp_path / "other", layout)  # the same adapters on another base checkpoint (same weights, new files)
    cases = [
        (str(full), "holds its frozen weights too"),
        (str(paths["base"]), "holds no LoRA adapters"),
        (str(other["wide"]), "not the served checkpoint"),
        (str(tmp_path / "nowhere"), "is neither a checkpoint"),
    ]
    for path, problem in cases:
        with pytest.raises(ConfigError) as error:
            check_adapters({"team": path}, paths["base"], TEST_MODEL)
        assert error.value.key == "profiles.team.adapter" and problem in str(error.value), str(error.value)
    with pytest.raises(ConfigError) as error:
        check_adapters({"team": str(paths["wide"])}, paths["base"], replace(TEST_MODEL, hidden_size=128))
    assert error.value.key == "profiles.team.adapter"


def test_the_adapter_benchmark_decodes_the_four_sides(tmp_path) -> None:
    """`bench/adapter_serving.py`: no bank, a bank without adapter rows, one row on an adapter, every row on an
    adapter; side by side."""
    import json
    import subprocess
    import sys

    from tests.recipe_runner import ROOT, recipe_env

    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "adapter_serving.py"), "--preset", "tiny", "--batch-size", "3"]
    command += ["--new-tokens", "4", "--rounds", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sides = json.loads(out.read_text())["sides"]
    assert len(sides) == 4 and sides["no bank"]["ratio"] == 1.0 and all(s["tokens_per_s"] > 0 for s in sides.values())


def test_only_the_rows_with_an_adapter_run_its_products() -> None:
    """`AdapterRows.of`: none when no row has an adapter, every row without an index when all have one, else the
    adapted rows' places and adapters; `AdapterBank.add` then touches those rows alone."""
    from steerlm.inference.adapters import AdapterBank, AdapterRows

    assert AdapterRows.of(torch.tensor([0, 0])) is None
    every = AdapterRows.of(torch.tensor([2, 1]))
    assert every is not None and every.index is None and every.adapters.tolist() == [2, 1]
    some = AdapterRows.of(torch.tensor([0, 2, 0, 1]))
    assert some is not None and some.index.tolist() == [1, 3] and some.adapters.tolist() == [2, 1]
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 5, generator=generator), torch.randn(3, 4, 2, generator=generator)
    bank = AdapterBank(names=["x", "y"], a={(0, "linear_qkv"): a}, b={(0, "linear_qkv"): b})
    x, out = torch.randn(4, 3, 5, generator=generator), torch.randn(4, 3, 4, generator=generator)
    added = bank.add(out, x, 0, "linear_qkv", some)
    torch.testing.assert_close(added[[0, 2]], out[[0, 2]], rtol=0, atol=0)  # the served model's rows untouched
    for row, adapter in ((1, 2), (3, 1)):
        torch.testing.assert_close(added[row], out[row] + x[row] @ a[adapter].T @ b[adapter].T)
    assert bank.add(out, x, 0, "linear_fc2", some) is out  # a linear no adapter touches
