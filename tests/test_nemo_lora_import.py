"""NeMo LoRA archives (NeMo's PEFT training writes the adapters alone) imported on the `.nemo` model they adapt:
written at TP=2 by tests/nemo_archives.py's own record of NeMo's adapter layout (legacy per-rank files, at PP=1 and
PP=2, and megatron's distributed checkpoint), they read back as NeMo's merged weights W + alpha / dim * out @ in,
computed here from the full tensors; the checkpoint holds the adapters alone and names its base; what steerlm
cannot represent is refused naming it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerlm.checkpoint.sharded import load_weights, read_meta
from steerlm.config import ConfigError, PrecisionConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.schema import DType
from steerlm.errors import DataError
from steerlm.models import build_model_chunks
from steerlm.models.nemo_weights import NemoCheckpoint
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.convert import convert
from steerlm.stages.nemo_import import import_nemo_lora
from tests.nemo_archives import (
    LAYERS,
    LORA_ALPHA,
    LORA_RANK,
    NEMO_ADAPTERS,
    lora_tensors,
    nemo_config,
    nemo_lora_config,
    nemo_tensors,
    to_tar,
    write_distributed,
    write_legacy,
)
from tests.nemo_archives import llama as source_llama
from tests.recipe_runner import checkpoint_tensors

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The base model's full tensors by megatron name (the local spec's norm names, steerlm's)."""
    return nemo_tensors(source_llama(), False, False)


@pytest.fixture(scope="module")
def base(full, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    return to_tar(write_legacy(root / "base", full, nemo_config(), pipeline=1))


def _archive(root: Path, kind: str, adapters: dict, config: dict) -> Path:
    if kind == "distributed":
        return write_distributed(root, adapters, config)
    return to_tar(write_legacy(root, adapters, config, pipeline=2 if kind == "legacy_pp2" else 1))


def _merged(full: dict, adapters: dict, linears: list[str]) -> dict[str, torch.Tensor]:
    """NeMo's merged weights (its merge_lora_weights script, with ParallelLinearAdapter's alpha / dim scale)."""
    merged = dict(full)
    for layer in range(LAYERS):
        for linear in linears:
            group, adapter, _ = NEMO_ADAPTERS[linear]
            prefix = f"decoder.layers.{layer}.{group}.adapter_layer.{adapter}"
            update = adapters[f"{prefix}.linear_out.weight"] @ adapters[f"{prefix}.linear_in.weight"]
            name = f"decoder.layers.{layer}.{group}.{linear}.weight"
            merged[name] = full[name] + LORA_ALPHA / LORA_RANK * update
    return merged


def _read(path: Path, base: Path, layout) -> dict[str, torch.Tensor]:
    with NemoCheckpoint(base) as source:
        model = source.model
    chunks = build_model_chunks(model, PrecisionConfig(), layout, seed=5)
    load_weights(path, chunks, layout, model)
    return {name: param.detach().clone() for name, param in named_global_parameters(chunks)}


@pytest.mark.parametrize(
    "kind,linears",
    [("legacy", ALL), ("legacy_pp2", ["linear_qkv", "linear_fc1"]), ("distributed", ALL)],
)
def test_nemo_lora_adapters_read_as_nemos_merged_weights(layout, full, base, tmp_path, kind, linears) -> None:
    adapters = lora_tensors(full, linears)
    archive = _archive(tmp_path / "lora", kind, adapters, nemo_lora_config(linears))
    path = import_nemo_lora(archive, base, tmp_path / "imported", layout)
    meta = read_meta(path)
    assert meta.lora == {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": linears}
    assert meta.base is not None and meta.base["format"] == "NeMo" and meta.base["path"] == str(base.resolve())
    stored = checkpoint_tensors(path)
    assert stored and all(".lora_a" in key or ".lora_b" in key for key in stored), sorted(stored)[:3]
    got, expected = _read(path, base, layout), _merged(full, adapters, linears)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_convert_imports_a_lora_archive_on_its_base_and_exports_it_for_peft(layout, full, base, tmp_path) -> None:
    """`recipes/convert.py input=<lora.nemo> base=<model.nemo>`, then `to=peft` of the result: vLLM's adapter."""
    import json

    archive = _archive(tmp_path / "lora", "legacy", lora_tensors(full, ALL), nemo_lora_config(ALL))
    cfg = ConvertConfig(input=str(archive), output=str(tmp_path / "imported"), base=str(base))
    cfg.validate()
    convert(cfg, layout)
    peft = ConvertConfig(input=str(tmp_path / "imported"), output=str(tmp_path / "peft"), to=ModelFormat.peft)
    peft.validate()
    convert(peft, layout)
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (LORA_RANK, LORA_ALPHA)
    one_step = replace(cfg, output=str(tmp_path / "peft_at_once"), to=ModelFormat.peft)  # through a steerlm checkpoint
    one_step.validate()
    convert(one_step, layout)
    assert json.loads((tmp_path / "peft_at_once" / "adapter_config.json").read_text()) == adapter
    weights = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "peft_at_once")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["imported", "lora", "lora.nemo", "peft", "peft_at_once"]
    with pytest.raises(ConfigError) as error:
        replace(cfg, output=str(tmp_path / "x"), dtype=DType.bf16).validate()  # adapters keep the base's dtype
    assert error.value.key == "dtype"
    with pytest.raises(ConfigError) as error:
        replace(cfg, input=str(tmp_path / "imported"), output=str(tmp_path / "y")).validate()
    assert error.value.key == "base"


@pytest.mark.parametrize(
    "tuning,field",
    [
        ({"layer_selection": [1]}, "peft.lora_tuning.layer_selection"),
        ({"activation": "swish"}, "peft.lora_tuning.activation"),
        ({"target_modules": ["attention_qkv", "linear_qkv"]}, "peft.lora_tuning.target_modules"),
    ],
)
def test_lora_settings_steerlm_cannot_represent_are_refused(layout, full, base, tmp_path, tuning, field) -> None:
    config = nemo_lora_config(["linear_qkv"], **tuning)
    archive = _archive(tmp_path / "lora", "legacy", lora_tensors(full, ["linear_qkv"]), config)
    with pytest.raises(DataError) as error:
        import_nemo_lora(archive, base, tmp_path / "imported", layout)
    assert error.value.field == field, str(error.value)


def test_archives_that_are_not_what_they_claim_are_refused(layout, full, base, tmp_path) -> None:
    adapters = lora_tensors(full, ["linear_qkv"])
    config = nemo_lora_config(["linear_qkv"])
    scheme = _archive(tmp_path / "ptuning", "legacy", adapters, {**config, "peft": {"peft_scheme": "ptuning"}})
    with pytest.raises(DataError) as error:
        import_nemo_lora(scheme, base, tmp_path / "a", layout)
    assert error.value.field == "peft.peft_scheme"
    announced = _archive(tmp_path / "announced", "legacy", adapters, nemo_lora_config(["linear_qkv", "linear_fc2"]))
    with pytest.raises(DataError, match=r"has no tensor for decoder\.layers\.0\.mlp\.linear_fc2\.lora_a"):
        import_nemo_lora(announced, base, tmp_path / "b", layout)
    with pytest.raises(DataError, match="holds model weights"):
        import_nemo_lora(
            _archive(tmp_path / "full", "legacy", {**full, **adapters}, config), base, tmp_path / "c", layout
        )
    with pytest.raises(DataError, match="holds LoRA adapters alone"):
        NemoCheckpoint(_archive(tmp_path / "alone", "legacy", adapters, config))


def _archive_states(archive: Path) -> dict[str, dict]:
    """Every `model_weights.ckpt` of a `.nemo` tar, loaded, by its path in the archive."""
    import io
    import tarfile

    with tarfile.open(archive) as tar:
        return {
            member.name.removeprefix("./"): torch.load(io.BytesIO(tar.extractfile(member).read()), weights_only=True)
            for member in tar.getmembers()
            if member.name.endswith("model_weights.ckpt")
        }


def _archive_config(archive: Path) -> dict:
    import tarfile

    import yaml

    with tarfile.open(archive) as tar:
        return yaml.safe_load(tar.extractfile("./model_config.yaml").read())


def _written_legacy(directory: Path, adapters: dict, pipeline: int) -> dict[str, dict]:
    """This file's own record of NeMo's legacy layout (`write_legacy`, at TP=2) of `adapters`, by path."""
    write_legacy(directory, adapters, nemo_lora_config(ALL), pipeline)
    return {
        path.relative_to(directory).as_posix(): torch.load(path, weights_only=True)
        for path in directory.rglob("model_weights.ckpt")
    }


@pytest.mark.slow
def test_a_lora_run_exports_as_nemos_peft_archive_at_its_layout(layout, full, base, tmp_path) -> None:
    """A NeMo LoRA archive imported on its base (a steerlm run of the adapters alone), exported with to=nemo_lora:
    at TP=1 the root's model_weights.ckpt holds NeMo's full tensors; at TP=2 and TP=2 x PP=2 (torchrun) the rank
    files are those this file's own record of NeMo's layout makes of the same tensors (slices, stage-local layer
    numbers), bitwise; the config announces them as NeMo's peft section does; imported back on the base, the
    adapters are the same; NeMo's TP=2 archive converts to a TP=1 one in one command."""
    from tests.recipe_runner import TORCHRUN_2, run_recipe

    adapters = lora_tensors(full, ALL)
    source = _archive(tmp_path / "lora", "legacy", adapters, nemo_lora_config(ALL))
    imported = convert(ConvertConfig(input=str(source), output=str(tmp_path / "imported"), base=str(base)), layout)
    out = tmp_path / "out.nemo"
    cfg = ConvertConfig(input=str(imported), output=str(out), to=ModelFormat.nemo_lora)
    cfg.validate()
    convert(cfg, layout)
    states = _archive_states(out)
    assert states.keys() == {"model_weights.ckpt"}
    expected = {"model." + name: tensor for name, tensor in adapters.items()}
    assert states["model_weights.ckpt"].keys() == expected.keys()
    assert all(torch.equal(states["model_weights.ckpt"][key], tensor) for key, tensor in expected.items())
    config = _archive_config(out)
    assert config["peft"]["peft_scheme"] == "lora" and config["peft"]["restore_from_path"] == str(base.resolve())
    tuning = config["peft"]["lora_tuning"]
    assert (tuning["adapter_dim"], tuning["alpha"], tuning["layer_selection"]) == (LORA_RANK, LORA_ALPHA, None)
    assert tuning["target_modules"] == [NEMO_ADAPTERS[linear][2] for linear in ALL]
    assert config["num_layers"] == LAYERS and config["tensor_model_parallel_size"] == 1
    back = convert(ConvertConfig(input=str(out), output=str(tmp_path / "back"), base=str(base)), layout)
    # NeMo's TP=2 archive to a TP=1 one in one command (through a temporary steerlm checkpoint): the same file
    once = tmp_path / "once.nemo"
    convert(ConvertConfig(input=str(source), output=str(once), base=str(base), to=ModelFormat.nemo_lora), layout)
    resharded = _archive_states(once)["model_weights.ckpt"]
    assert resharded.keys() == expected.keys() and all(torch.equal(resharded[k], v) for k, v in expected.items())
    first, again = _read(imported, base, layout), _read(back, base, layout)
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)

    torchrun_4 = [*TORCHRUN_2[:-1], "4"]
    for parallel, launcher, pipeline in (("tp2", TORCHRUN_2, 1), ("tp2_pp2", torchrun_4, 2)):
        split = tmp_path / f"{parallel}.nemo"
        done = run_recipe(
            "convert", [f"input={imported}", f"output={split}", "to=nemo_lora", f"parallel={parallel}"], launcher
        )
        assert done.returncode == 0, done.stderr[-3000:]
        written, reference = _archive_states(split), _written_legacy(tmp_path / f"{parallel}_ref", adapters, pipeline)
        assert written.keys() == reference.keys(), sorted(written)
        for file, state in reference.items():
            assert written[file].keys() == state.keys(), file
            assert all(torch.equal(written[file][key], tensor) for key, tensor in state.items()), file
        assert _archive_config(split)["pipeline_model_parallel_size"] == pipeline


def test_runs_without_adapters_alone_are_not_exported_as_nemo_lora(layout, full, base, tmp_path) -> None:
    imported = tmp_path / "model"
    convert(ConvertConfig(input=str(base), output=str(imported)), layout)
    cfg = ConvertConfig(input=str(imported), output=str(tmp_path / "out.nemo"), to=ModelFormat.nemo_lora)
    cfg.validate()
    with pytest.raises(ConfigError, match="holds no LoRA adapters") as error:
        convert(cfg, layout)
    assert error.value.key == "input" and "to=nemo" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
