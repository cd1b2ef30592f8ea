"""Adapters-only LoRA checkpoints (`lora.checkpoint`): a LoRA run started from other weights saves its adapters
alone, every read of such a checkpoint (resume, weights, init_from, exports) gives what a self-contained one gives,
and a base that is gone or changed is refused naming its path."""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from steerlm.checkpoint.integrity import CheckpointError
from steerlm.checkpoint.sharded import WeightsOnly, load_weights, read_meta, resolve_checkpoint, save_checkpoint
from steerlm.checkpoint.sources import BaseWeights, WeightFormat, fingerprint
from steerlm.config import ConfigError, LoraConfig, PrecisionConfig, TrainConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.lora import LoraCheckpoint
from steerlm.models import build_model_chunks, lora
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.hf_llama import hf_config_dict, megatron_to_hf
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.convert import convert
from steerlm.stages.nemo_import import import_nemo
from steerlm.tokenizers import WordTokenizer
from steerlm.training import build_training
from steerlm.training.init_from import resolve_init_source, resume_or_initialise
from tests.conftest import TEST_MODEL
from tests.recipe_runner import TORCHRUN_2, run_recipe, train_losses

LORA = LoraConfig(rank=4, alpha=8.0)


def _logits(chunk, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : TEST_MODEL.vocab_size]


TOKENS = torch.randint(0, TEST_MODEL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))


def _steerlm_base(layout, where: Path, seed: int) -> Path:
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed)[0]
    save_checkpoint(where, 0, WeightsOnly([chunk]), layout, TrainConfig(model=TEST_MODEL))
    return where


def _hf_base(layout, where: Path, seed: int) -> Path:
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed)[0]
    full = {name: param.detach() for name, param in named_global_parameters([chunk])}
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps(hf_config_dict(TEST_MODEL)))
    save_file(megatron_to_hf(full, TEST_MODEL), str(where / "model.safetensors"))
    return where


BASES = {"steerlm": _steerlm_base, "hf": _hf_base}


def _lora_run(layout, output: Path, init: str | None, mode: LoraCheckpoint = LoraCheckpoint.auto, b_seed: int = 11):
    """A LoRA run's first start (from `init`), its B given values so the adapters count; its setup and config."""
    cfg = TrainConfig(model=TEST_MODEL, lora=replace(LORA, checkpoint=mode), output_dir=str(output))
    setup = build_training(cfg, layout)
    resume_or_initialise(cfg, output, setup, layout, resolve_init_source("sft.init_from", init, TEST_MODEL))
    generator = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for name, param in setup.chunks[0].named_parameters():
            if name.endswith(".lora_b"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    setup.model[0].zero_grad_buffer()
    setup.optimizer.step()  # zero gradients: Adam's state exists (a checkpoint before any step would have none)
    return setup, cfg


def _stored_tensors(checkpoint: Path) -> set[str]:
    """The model tensors a checkpoint's shards hold (torch.distributed.checkpoint's index)."""
    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {key for key in keys if not key.startswith(("optimizer.", "rng_state"))}


def _shard_bytes(checkpoint: Path) -> int:
    return sum(file.stat().st_size for file in checkpoint.glob("*.distcp"))


def _merged_logits(layout, checkpoint: Path) -> torch.Tensor:
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 99)[0]
    load_weights(checkpoint, [plain], layout, TEST_MODEL)
    assert not any(lora.is_adapter(name) for name, _ in plain.named_parameters())
    return _logits(plain, TOKENS)


@pytest.mark.parametrize("source", sorted(BASES))
def test_an_adapters_only_checkpoint_reads_as_the_self_contained_one(layout, tmp_path: Path, source: str) -> None:
    """From a steerlm checkpoint or a Hugging Face directory, `auto` saves the adapters alone (no frozen tensor in
    its shards, a fraction of the bytes) naming the base; read as weights, or as another run's init_from, it gives
    the adapted model's logits, as the self-contained checkpoint of the same run does."""
    base = BASES[source](layout, tmp_path / "base", seed=3)
    setup, cfg = _lora_run(layout, tmp_path / "run", str(base))
    adapted = _logits(setup.chunks[0], TOKENS)
    alone = save_checkpoint(tmp_path / "run", 1, setup, layout, cfg)
    format = WeightFormat.steerlm if source == "steerlm" else WeightFormat.hugging_face
    base_path = resolve_checkpoint(base) if source == "steerlm" else base
    assert read_meta(alone).base == asdict(BaseWeights.of(format, base_path))
    assert _stored_tensors(alone) and all(lora.is_adapter(key) for key in _stored_tensors(alone))
    whole = save_checkpoint(tmp_path / "whole", 1, replace(setup, base=None), layout, cfg)
    assert read_meta(whole).base is None and not all(lora.is_adapter(key) for key in _stored_tensors(whole))
    assert _shard_bytes(alone) < 0.3 * _shard_bytes(whole)
    assert torch.allclose(_merged_logits(layout, alone), adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(_merged_logits(layout, alone), _merged_logits(layout, whole))
    # a plain run, and a LoRA run whose own checkpoints then name this adapters-only one as their base
    for own, output in ((LoraConfig(), tmp_path / "plain"), (LORA, tmp_path / "next")):
        next_cfg = TrainConfig(model=TEST_MODEL, lora=own, output_dir=str(output))
        follower = build_training(next_cfg, layout)
        resume_or_initialise(
            next_cfg, output, follower, layout, resolve_init_source("sft.init_from", str(alone), TEST_MODEL)
        )
        assert torch.allclose(_logits(follower.chunks[0], TOKENS), adapted, rtol=1e-5, atol=1e-5)
    chained = save_checkpoint(tmp_path / "next", 1, follower, layout, next_cfg)
    assert read_meta(chained).base == asdict(BaseWeights.of(WeightFormat.steerlm, alone))
    assert torch.allclose(_merged_logits(layout, chained), adapted, rtol=1e-5, atol=1e-5)


def test_an_apm_s_head_is_saved_with_its_adapters(layout, tmp_path: Path) -> None:
    """An APM's head, which no base model has, trains in full and is saved beside the adapters; read as weights the
    checkpoint gives the APM's scores."""
    base = _steerlm_base(layout, tmp_path / "base", seed=3)
    provider = partial(build_attribute_model_chunks, num_attributes=3)
    cfg = TrainConfig(model=TEST_MODEL, lora=LORA, output_dir=str(tmp_path / "apm"))
    setup = build_training(cfg, layout, model_provider=provider)
    resume_or_initialise(
        cfg, tmp_path / "apm", setup, layout, resolve_init_source("apm.init_from", str(base), TEST_MODEL)
    )
    with torch.no_grad():
        for name, param in setup.chunks[0].named_parameters():
            if lora.trained(name):
                param.add_(0.05)
    scores = _logits(setup.chunks[0], TOKENS)
    checkpoint = save_checkpoint(tmp_path / "apm", 1, setup, layout, cfg)
    stored = _stored_tensors(checkpoint)
    assert {key for key in stored if not lora.is_adapter(key)} == {"attribute_head.weight", "attribute_head.bias"}
    plain = provider(TEST_MODEL, PrecisionConfig(), layout, 99)[0]
    load_weights(checkpoint, [plain], layout, TEST_MODEL)
    assert torch.allclose(_logits(plain, TOKENS), scores, rtol=1e-5, atol=1e-5)


def test_a_base_gone_or_changed_is_refused_naming_its_path(layout, tmp_path: Path) -> None:
    base = _steerlm_base(layout, tmp_path / "base", seed=3)
    setup, cfg = _lora_run(layout, tmp_path / "run", str(base))
    checkpoint = save_checkpoint(tmp_path / "run", 1, setup, layout, cfg)
    expected = _merged_logits(layout, checkpoint)
    base_step = resolve_checkpoint(base)
    shutil.move(base, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="is missing") as error:
        _merged_logits(layout, checkpoint)
    assert error.value.path == base_step and "symbolic link" in error.value.fix
    exported = tmp_path / "adapter"  # a PEFT export reads the adapters alone: no base needed
    export = ConvertConfig(input=str(tmp_path / "run"), output=str(exported), to=ModelFormat.peft)
    export.validate()
    convert(export, layout)
    assert (exported / "adapter_model.safetensors").stat().st_size > 0
    (tmp_path / "base").symlink_to(tmp_path / "moved")  # the fix the error names
    assert torch.equal(_merged_logits(layout, checkpoint), expected)
    (tmp_path / "base").unlink()
    _steerlm_base(layout, tmp_path / "base", seed=4)  # another model at the same path
    with pytest.raises(CheckpointError, match="has changed since") as error:
        _merged_logits(layout, checkpoint)
    assert error.value.path == base_step


def test_to_steerlm_writes_an_adapters_only_run_as_weights_that_need_no_base(layout, tmp_path: Path) -> None:
    """`recipes/convert.py to=steerlm`: the adapters merged into their base's weights, without optimizer state,
    adapters or a base to read; it gives the adapted model's logits after the base is gone."""
    base = _steerlm_base(layout, tmp_path / "base", seed=3)
    setup, cfg = _lora_run(layout, tmp_path / "run", str(base))
    alone = save_checkpoint(tmp_path / "run", 1, setup, layout, cfg)
    expected = _merged_logits(layout, alone)
    whole = save_checkpoint(tmp_path / "whole", 1, replace(setup, base=None), layout, cfg)
    copy = ConvertConfig(input=str(tmp_path / "run"), output=str(tmp_path / "copy"), to=ModelFormat.steerlm)
    copy.validate()
    convert(copy, layout)
    written = resolve_checkpoint(tmp_path / "copy")
    meta = read_meta(written)
    assert meta.weights_only and meta.base is None and meta.lora is None and meta.step == 1

    def keys(checkpoint: Path) -> set[str]:
        return set(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)

    assert any(key.startswith("optimizer.") for key in keys(alone))
    assert not any(key.startswith("optimizer.") or lora.is_adapter(key) for key in keys(written))
    assert _stored_tensors(written) == {key for key in _stored_tensors(whole) if not lora.is_adapter(key)}
    shutil.rmtree(base)
    assert torch.equal(_merged_logits(layout, written), expected)


def test_to_nemo_writes_an_adapters_only_run_merged(layout, tmp_path: Path) -> None:
    """`recipes/convert.py to=nemo` of an adapters-only LoRA run: the archive holds the merged weights (no adapter),
    and imported back it gives the adapted model's logits after the base is gone."""
    base = _steerlm_base(layout, tmp_path / "base", seed=3)
    setup, cfg = _lora_run(layout, tmp_path / "run", str(base))
    expected = _merged_logits(layout, save_checkpoint(tmp_path / "run", 1, setup, layout, cfg))
    WordTokenizer.build(["a b c"]).save(tmp_path / "words")
    archive = tmp_path / "run.nemo"
    nemo = ConvertConfig(
        str(tmp_path / "run"), str(archive), to=ModelFormat.nemo, tokenizer_path=str(tmp_path / "words")
    )
    nemo.validate()
    convert(nemo, layout)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "./model_weights/.metadata" in names and not any("lora" in name for name in names)
    shutil.rmtree(base)
    imported = import_nemo(archive, tmp_path / "back", layout)
    keys = FileSystemReader(str(imported)).read_metadata().state_dict_metadata
    assert not any(lora.is_adapter(key) for key in keys)
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 98)[0]
    load_weights(imported, [chunk], layout, replace(TEST_MODEL, vocab_size=TEST_MODEL.padded_vocab_size))
    assert torch.equal(_logits(chunk, TOKENS), expected)


def test_the_fingerprint_reads_a_weight_files_size_and_ends(tmp_path: Path) -> None:
    """Bytes in the first or the last MiB of a weight file, or its size, change it; a file beside an HF model's
    weights (a README, a tokenizer) does not."""
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    payload = bytearray(torch.randint(0, 256, (5 << 20,), generator=torch.Generator().manual_seed(0)).to(torch.uint8))
    weights.write_bytes(payload)
    first = fingerprint(WeightFormat.hugging_face, model)
    (model / "README.md").write_text("notes")
    (model / "tokenizer.json").write_text("{}")
    assert fingerprint(WeightFormat.hugging_face, model) == first
    for offset in (10, len(payload) - 10):
        changed = bytearray(payload)
        changed[offset] ^= 1
        weights.write_bytes(changed)
        assert fingerprint(WeightFormat.hugging_face, model) != first
    weights.write_bytes(payload + b"\0")
    assert fingerprint(WeightFormat.hugging_face, model) != first
    weights.write_bytes(payload)
    assert fingerprint(WeightFormat.hugging_face, model) == first
    archive = tmp_path / "model.nemo"  # a .nemo tar is one weight file
    archive.write_bytes(payload)
    assert fingerprint(WeightFormat.nemo, archive) != fingerprint(WeightFormat.nemo, weights)


def test_the_checkpoint_mode_is_kept_refused_or_switched_to_full(layout, tmp_path: Path) -> None:
    """`adapters` needs a base (an init_from, or a run whose checkpoints name one) and adapters (lora.rank);
    `full` makes a resumed adapters-only run's next checkpoints self-contained; `auto` goes on as the run did."""
    with pytest.raises(ConfigError) as error:
        _lora_run(layout, tmp_path / "scratch", None, LoraCheckpoint.adapters)
    assert error.value.key == "lora.checkpoint" and "init_from" in str(error.value)
    with pytest.raises(ConfigError) as error:
        LoraConfig(checkpoint=LoraCheckpoint.adapters).validate()
    assert error.value.key == "lora.checkpoint" and "lora.rank" in str(error.value)
    setup, cfg = _lora_run(layout, tmp_path / "scratch", None)
    assert setup.base is None  # auto without init_from: self-contained
    save_checkpoint(tmp_path / "scratch", 1, setup, layout, cfg)
    base = _steerlm_base(layout, tmp_path / "base", seed=3)
    setup, cfg = _lora_run(layout, tmp_path / "run", str(base))
    save_checkpoint(tmp_path / "run", 1, setup, layout, cfg)
    for output, mode, expected in (
        (tmp_path / "run", LoraCheckpoint.auto, setup.base),
        (tmp_path / "run", LoraCheckpoint.adapters, setup.base),
        (tmp_path / "run", LoraCheckpoint.full, None),
        (tmp_path / "scratch", LoraCheckpoint.auto, None),
    ):
        resumed_cfg = replace(cfg, lora=replace(LORA, checkpoint=mode), output_dir=str(output))
        resumed = build_training(resumed_cfg, layout)
        assert resume_or_initialise(resumed_cfg, output, resumed, layout, None) == 1
        assert resumed.base == expected
    refused_cfg = replace(cfg, lora=replace(LORA, checkpoint=LoraCheckpoint.adapters))
    with pytest.raises(ConfigError) as error:
        resume_or_initialise(refused_cfg, tmp_path / "scratch", build_training(refused_cfg, layout), layout, None)
    assert error.value.key == "lora.checkpoint" and "lora.checkpoint=auto or full" in str(error.value)


@pytest.mark.slow
def test_an_adapters_only_run_resumes_exactly_and_exports_what_a_full_one_does(tmp_path: Path) -> None:
    """The pretrain recipe from a base: 20 steps saving adapters alone equal 20 saving everything, and 10 at DP=2
    with the distributed optimizer (its Adam state sharded) then 10 at one rank with a plain optimizer; their HF
    exports are byte for byte the same."""
    docs = [
        f"{a} {v} {o}." for a in ("Owls", "Cats", "Dogs") for v in ("hunt", "sleep", "swim") for o in ("now", "here")
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs * 12))
    tokenizer = WordTokenizer.build(docs)
    tokenizer.save(tmp_path / "tok")
    common = [
        f"data.train_file={corpus}",
        f"tokenizer.path={tmp_path / 'tok'}",
        f"model.vocab_size={tokenizer.vocab_size}",
    ]
    common += ["trainer.seq_length=32", "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]
    common += ["trainer.eval_interval=null", "trainer.log_interval=2", "checkpoint.save_interval=10"]
    common += ["optim.lr_warmup_steps=2", "optim.lr_decay_steps=20"]
    distributed = "parallel.use_distributed_optimizer=true"
    made = run_recipe("pretrain", [*common, distributed, "trainer.max_steps=10", f"output_dir={tmp_path / 'base'}"])
    assert made.returncode == 0, made.stderr[-3000:]
    adapted = [*common, "lora.rank=4", "lora.alpha=8", f"pretrain.init_from={tmp_path / 'base'}"]
    runs = {name: tmp_path / name for name in ("alone", "whole", "resumed")}
    for args, launcher in (
        ([*adapted, distributed, "trainer.max_steps=20", f"output_dir={runs['alone']}"], None),
        ([*adapted, distributed, "lora.checkpoint=full", "trainer.max_steps=20", f"output_dir={runs['whole']}"], None),
        ([*adapted, distributed, "trainer.max_steps=10", f"output_dir={runs['resumed']}"], TORCHRUN_2),
        ([*adapted, "trainer.max_steps=20", f"output_dir={runs['resumed']}"], None),
    ):
        result = run_recipe("pretrain", args, launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(runs["whole"])
    assert len(losses) == 10 and train_losses(runs["alone"]) == losses
    assert train_losses(runs["resumed"]) == pytest.approx(losses, rel=1e-5)
    assert read_meta(resolve_checkpoint(runs["whole"])).base is None
    for name in ("alone", "resumed"):
        assert read_meta(resolve_checkpoint(runs[name])).base["path"] == str(resolve_checkpoint(tmp_path / "base"))
    exports = {}
    for name in ("alone", "whole"):
        out = tmp_path / f"{name}_hf"
        converted = run_recipe("convert", [f"input={runs[name]}", f"output={out}", "to=hf"])
        assert converted.returncode == 0, converted.stderr[-3000:]
        exports[name] = {file.name: file.read_bytes() for file in out.rglob("*.safetensors")}
    assert exports["alone"] and exports["alone"] == exports["whole"]


@pytest.mark.slow
def test_the_checkpoint_benchmark_compares_adapters_alone_with_full(tmp_path: Path) -> None:
    """`bench/lora_checkpoint.py`: both kinds saved and resumed side by side; the adapters alone are smaller."""
    import subprocess
    import sys

    from tests.recipe_runner import ROOT, recipe_env

    out = tmp_path / "checkpoints.json"
    command = [sys.executable, str(ROOT / "bench" / "lora_checkpoint.py"), "--preset", "tiny", "--lora-rank", "2"]
    result = subprocess.run(
        [*command, "--rounds", "1", "--json", str(out)], cwd=ROOT, env=recipe_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert 0 < measured["adapters"]["bytes"] < 0.3 * measured["full"]["bytes"]
    assert all(measured[kind][what] > 0 for kind in ("full", "adapters") for what in ("save_s", "resume_s"))
    assert "ratio adapters / full" in result.stdout
