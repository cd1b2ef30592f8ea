"""LoRA adapters (steerlm.models.lora): the adapted model equals PEFT's LoRA on HF's Llama with the same weights,
TP=2 (also with sequence parallelism) and PP=2 train with the numbers of one rank while the base weights stay
bitwise frozen, a checkpoint merges into the weights wherever it is read as weights, and runs resume exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import (
    WeightsOnly,
    load_adapters,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from steerlm.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
    TransformerImpl,
)
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.schema import TokenizerConfig, TokenizerType, TrainDataConfig
from steerlm.config.sft import SFTConfig
from steerlm.models import build_model_chunks, lora
from steerlm.models.hf_llama import hf_config_dict, lora_projections, megatron_lora_to_peft_tensors, megatron_to_hf
from steerlm.models.sharding import load_full_parameters, named_global_parameters
from steerlm.stages.convert import convert
from steerlm.tokenizers import WordTokenizer
from steerlm.training import build_training
from steerlm.training.init_from import load_init_weights, resolve_init_source
from tests.conftest import GEMMA2_MODEL, NEMOTRON_MODEL, PHI3_MODEL, QWEN2_MODEL, TEST_MODEL, randomize_biases
from tests.multiproc import run_distributed
from tests.recipe_runner import TORCHRUN_2, run_recipe, summary, train_losses
from tests.test_convert import SCHEMA, TEXTS

LORA = LoraConfig(rank=4, alpha=8.0)


def _adapted(layout, cfg: LoraConfig = LORA, model: ModelConfig = TEST_MODEL, seed: int = 7):
    chunk = build_model_chunks(model, PrecisionConfig(), layout, seed)[0]
    lora.attach([chunk], cfg, seed)
    return chunk


def _randomise_b(chunk, seed: int = 11) -> None:
    """B starts at zero (the adapted model is the base model); tests give it values so the low-rank path counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            if name.endswith(".lora_b"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _tokens(rows: int = 2, length: int = 24, vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(3))
    return tokens, torch.arange(length).expand(rows, length)


def test_adapters_start_as_the_base_model_and_train_alone(layout) -> None:
    base = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 7)[0]
    chunk = _adapted(layout)
    tokens, positions = _tokens()
    with torch.no_grad():
        assert torch.equal(chunk(tokens, positions, None), base(tokens, positions, None))
    lora.freeze_base([chunk])
    trainable = sorted(name for name, param in chunk.named_parameters() if param.requires_grad)
    assert trainable == sorted(name for name, _ in chunk.named_parameters() if lora.is_adapter(name))
    # 2 layers x 4 linears x (A, B)
    assert len(trainable) == 2 * 4 * 2


@pytest.mark.parametrize(
    "model,targets",
    [
        (TEST_MODEL, list(LORA.targets)),
        (TEST_MODEL, ["linear_qkv"]),
        (TEST_MODEL, ["linear_proj", "linear_fc2"]),
        (NEMOTRON_MODEL, list(LORA.targets)),  # an ungated fc1: PEFT adapts `up_proj` alone
        (QWEN2_MODEL, ["linear_qkv"]),  # the adapters beside q/k/v_proj's random biases
        (PHI3_MODEL, list(LORA.targets)),  # fused: PEFT adapts `qkv_proj` and `gate_up_proj` whole
        # inside the sublayers, before Gemma 2's norms of their output
        (replace(GEMMA2_MODEL, share_embeddings_and_output_weights=False), ["linear_proj", "linear_fc2"]),
    ],
    ids=["llama-all", "llama-qkv", "llama-proj-fc2", "nemotron-all", "qwen2-qkv", "phi3-all", "gemma2-proj-fc2"],
)
def test_adapted_logits_equal_peft_lora_on_the_hf_model(layout, model: ModelConfig, targets: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = replace(LORA, targets=targets)
    chunk = _adapted(layout, cfg, model)
    _randomise_b(chunk)
    randomize_biases([chunk], layout)
    full = {name: param.detach() for name, param in named_global_parameters([chunk])}
    base = {name: tensor for name, tensor in full.items() if not lora.is_adapter(name)}
    fields = hf_config_dict(model)
    hf_config = transformers.AutoConfig.for_model(
        fields["model_type"], **{k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
    )
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    loaded = hf.load_state_dict(megatron_to_hf(base, model), strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    projections = sorted({projection for target in targets for projection in lora_projections(model)[target][1]})
    wrapped = peft.get_peft_model(
        hf, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=projections, lora_dropout=0.0)
    ).eval()
    adapters = {
        peft_name: tensor
        for name, tensor in full.items()
        if lora.is_adapter(name)
        for peft_name, tensor in megatron_lora_to_peft_tensors(name, tensor, model)
    }
    result = peft.set_peft_model_state_dict(wrapped, adapters)
    assert not result.unexpected_keys
    tokens, positions = _tokens(length=64)
    with torch.no_grad():
        ours = chunk(tokens, positions, None)[..., : model.vocab_size]
        theirs = wrapped(input_ids=tokens).logits
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()


def test_dropout_drops_the_adapters_input_as_peft_does_while_training(layout) -> None:
    """In training mode the adapters' input is dropped as PEFT's lora_dropout drops it (the same mask from the same
    RNG: one row, so megatron's sequence-first and HF's batch-first layouts hold the input in the same order); in
    eval mode nothing is dropped."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=["linear_proj", "linear_fc2"])
    chunk = _adapted(layout, cfg)
    _randomise_b(chunk)
    full = {name: param.detach() for name, param in named_global_parameters([chunk])}
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in hf_config_dict(TEST_MODEL).items() if k not in ("architectures", "model_type")}
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(megatron_to_hf({n: t for n, t in full.items() if not lora.is_adapter(n)}, TEST_MODEL), False)
    wrapped = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["o_proj", "down_proj"], lora_dropout=0.3)
    )
    adapters = {
        peft_name: tensor
        for name, tensor in full.items()
        if lora.is_adapter(name)
        for peft_name, tensor in megatron_lora_to_peft_tensors(name, tensor, TEST_MODEL)
    }
    assert not peft.set_peft_model_state_dict(wrapped, adapters).unexpected_keys
    tokens, positions = _tokens(rows=1, length=32)
    outputs = {}
    for mode in ("train", "eval"):
        chunk.train(mode == "train")
        wrapped.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(21)
            ours = chunk(tokens, positions, None)[..., : TEST_MODEL.vocab_size]
            torch.manual_seed(21)
            theirs = wrapped(input_ids=tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        outputs[mode] = ours
    plain = _adapted(layout, replace(cfg, dropout=0.0))
    plain.load_state_dict(chunk.state_dict())
    plain.eval()
    assert torch.equal(_logits(plain, tokens), outputs["eval"])  # eval: the adapters as without dropout
    assert (outputs["train"] - outputs["eval"]).abs().max() > 1e-3  # training: the dropped input shows


def test_merge_folds_the_adapters_into_the_weights(layout) -> None:
    chunk = _adapted(layout)
    _randomise_b(chunk)
    tokens, positions = _tokens()
    with torch.no_grad():
        adapted = chunk(tokens, positions, None)
    lora.merge([chunk])
    assert lora.config_of(chunk) is None
    assert not any(lora.is_adapter(name) for name, _ in chunk.named_parameters())
    with torch.no_grad():
        merged = chunk(tokens, positions, None)
    assert torch.allclose(merged, adapted, rtol=1e-5, atol=1e-5), (merged - adapted).abs().max()


def test_detach_and_reattach_keep_the_same_parameters(layout) -> None:
    chunk = _adapted(layout)
    _randomise_b(chunk)
    before = dict(chunk.named_parameters())
    tokens, positions = _tokens()
    with torch.no_grad():
        adapted = chunk(tokens, positions, None)
    taken = lora.detach([chunk])
    load_full_parameters([chunk], {}, 0, 1, keep=lambda name: True)
    lora.reattach([chunk], taken)
    after = dict(chunk.named_parameters())
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    with torch.no_grad():
        assert torch.equal(chunk(tokens, positions, None), adapted)


# --- checkpoints: merged wherever they are read as weights, PEFT adapters out, init_from, resume ---------------


def _logits(chunk, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : TEST_MODEL.vocab_size]


@pytest.fixture(scope="module")
def saved(layout, tmp_path_factory) -> dict:
    """A LoRA checkpoint (rank 4, B given values) of a steerable test model (word tokenizer, three attributes)
    written at one rank, its adapted model's logits, and the base weights it adapts."""
    root = tmp_path_factory.mktemp("lora")
    chunk = _adapted(layout)
    _randomise_b(chunk)
    WordTokenizer.build(TEXTS).save(root / "tokenizer")
    cfg = SFTConfig(
        model=TEST_MODEL,
        output_dir=str(root / "run"),
        attributes=SCHEMA,
        tokenizer=TokenizerConfig(TokenizerType.word, str(root / "tokenizer")),
        data=TrainDataConfig(train_file="unused.jsonl"),
        lora=replace(LORA, dropout=0.1),  # the run's training-time dropout: PEFT's config records it
    )
    save_checkpoint(root / "run", 5, WeightsOnly([chunk]), layout, cfg)
    tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    weights = {name: param.detach().clone() for name, param in named_global_parameters([chunk])}
    base = {name: tensor for name, tensor in weights.items() if not lora.is_adapter(name)}
    return {
        "root": root,
        "run": root / "run",
        "checkpoint": resolve_checkpoint(root / "run"),
        "tokens": tokens,
        "logits": _logits(chunk, tokens),
        "base": base,
        "adapters": {name: tensor for name, tensor in weights.items() if lora.is_adapter(name)},
    }


def _conversions(jobs: list[tuple[str, str, str, int, int]]) -> None:
    for input, output, to, tp, pp in jobs:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        layout = runtime.initialize(parallel, seed=0)
        cfg = ConvertConfig(input=input, output=output, to=ModelFormat(to), parallel=parallel)
        cfg.validate()
        convert(cfg, layout)
        runtime.shutdown(destroy_process_group=False)
    runtime.shutdown()


def test_a_lora_checkpoint_reads_as_its_merged_weights(layout, saved: dict) -> None:
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 99)[0]
    load_weights(saved["checkpoint"], [plain], layout, TEST_MODEL)
    assert lora.config_of(plain) is None and not any(lora.is_adapter(n) for n, _ in plain.named_parameters())
    assert torch.allclose(_logits(plain, saved["tokens"]), saved["logits"], rtol=1e-5, atol=1e-5)
    alone = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 99)[0]
    untouched = {name: param.detach().clone() for name, param in named_global_parameters([alone])}
    assert load_adapters(saved["checkpoint"], [alone], layout, TEST_MODEL) == 5
    assert lora.config_of(alone) == LORA
    weights = dict(named_global_parameters([alone]))
    assert weights.keys() == untouched.keys() | saved["adapters"].keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in saved["adapters"].items())  # as trained
    assert all(torch.equal(weights[name], tensor) for name, tensor in untouched.items())  # nothing else read
    merged = dict(named_global_parameters([plain]))
    for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc2.weight"):
        assert not torch.equal(merged[name], saved["base"][name])  # the adapters changed what they adapt


@pytest.mark.slow
def test_exports_at_tp2_and_pp2_merge_or_keep_the_adapters(saved: dict) -> None:
    """At TP=2 and PP=2 (a checkpoint written at one rank): to=hf writes the merged model and to=peft the adapters,
    which PEFT loads onto the base weights; both give the adapted model's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root = saved["root"]
    run_distributed(
        _conversions,
        2,
        [
            (str(saved["run"]), str(root / "hf_tp2"), "hf", 2, 1),
            (str(saved["run"]), str(root / "peft_tp2"), "peft", 2, 1),
            (str(saved["run"]), str(root / "peft_pp2"), "peft", 1, 2),
        ],
    )
    merged = transformers.LlamaForCausalLM.from_pretrained(root / "hf_tp2").eval()
    with torch.no_grad():
        logits = merged(saved["tokens"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-4)
    config = json.loads((root / "peft_tp2" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["lora_dropout"] == 0.1
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    files = [(root / name / "adapter_model.safetensors").read_bytes() for name in ("peft_tp2", "peft_pp2")]
    assert files[0] == files[1]  # the layout that wrote them does not show
    templates = [
        transformers.AutoTokenizer.from_pretrained(root / name).chat_template for name in ("hf_tp2", "peft_tp2")
    ]
    assert templates[0] and templates[0] == templates[1]  # the steering chat template travels with the adapter
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in hf_config_dict(TEST_MODEL).items() if k not in ("architectures", "model_type")}
    )
    base = transformers.LlamaForCausalLM(hf_config).eval()
    base.load_state_dict(megatron_to_hf(saved["base"], TEST_MODEL), strict=False)
    with torch.no_grad():
        before = base(saved["tokens"]).logits
        adapted = peft.PeftModel.from_pretrained(base, root / "peft_tp2").eval()
        after = adapted(input_ids=saved["tokens"]).logits
    assert (before - saved["logits"]).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(after, saved["logits"], rtol=0, atol=1e-4)


def test_peft_export_of_a_run_without_adapters_is_refused(layout, saved: dict, tmp_path: Path) -> None:
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 7)[0]
    save_checkpoint(tmp_path / "plain", 1, WeightsOnly([chunk]), layout, TrainConfig(model=TEST_MODEL))
    cfg = ConvertConfig(input=str(tmp_path / "plain"), output=str(tmp_path / "out"), to=ModelFormat.peft)
    cfg.validate()
    with pytest.raises(ConfigError) as error:
        convert(cfg, layout)
    assert error.value.key == "input" and "no LoRA adapters" in str(error.value) and "to=hf" in str(error.value)


@pytest.mark.parametrize("own", [None, LoraConfig(rank=2, alpha=4.0, targets=["linear_fc1"])], ids=["plain", "lora"])
def test_init_from_a_lora_checkpoint_starts_from_its_merged_weights(layout, saved: dict, own) -> None:
    """A run (with adapters of its own or without) initialised from a LoRA run computes what that run's merged
    model computes; its own adapters keep their fresh values (B = 0)."""
    cfg = TrainConfig(model=TEST_MODEL, lora=own or LoraConfig())
    setup = build_training(cfg, layout)
    fresh = {name: p.detach().clone() for name, p in named_global_parameters(setup.chunks) if lora.is_adapter(name)}
    source = resolve_init_source("sft.init_from", str(saved["run"]), TEST_MODEL)
    load_init_weights(source, setup, layout, TEST_MODEL)
    assert lora.config_of(setup.chunks[0]) == own
    after = dict(named_global_parameters(setup.chunks))
    assert fresh.keys() == {name for name in after if lora.is_adapter(name)}
    assert all(torch.equal(after[name], value) for name, value in fresh.items())
    assert torch.allclose(_logits(setup.chunks[0], saved["tokens"]), saved["logits"], rtol=1e-5, atol=1e-5)


RUN = ["lora.rank=4", "lora.alpha=8", "trainer.log_interval=5", "trainer.eval_interval=10", "optim.lr_decay_steps=30"]


@pytest.mark.slow
def test_a_lora_run_learns_and_resumes_at_another_layout(tmp_path: Path) -> None:
    """The demo recipe with adapters: 30 steps at one rank equal 15 at TP=2 (or at DP=2 with the distributed
    optimizer, its Adam state sharded) then 15 more at one rank, the frozen base's loss falls, and a resume with
    other adapters (or none) is refused naming lora.rank."""
    straight, resumed, sharded = tmp_path / "straight", tmp_path / "resumed", tmp_path / "sharded"
    distributed = "parallel.use_distributed_optimizer=true"
    for args, launcher in (
        ([*RUN, "trainer.max_steps=30", f"output_dir={straight}"], None),
        ([*RUN, "trainer.max_steps=15", "parallel=tp2", f"output_dir={resumed}"], TORCHRUN_2),
        ([*RUN, "trainer.max_steps=30", f"output_dir={resumed}"], None),
        ([*RUN, distributed, "trainer.max_steps=15", f"output_dir={sharded}"], TORCHRUN_2),
        ([*RUN, distributed, "trainer.max_steps=30", f"output_dir={sharded}"], None),
    ):
        result = run_recipe("demo", args, launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    first = summary(straight)
    for run in (resumed, sharded):
        assert summary(run)["start_step"] == 15
        assert train_losses(run) == pytest.approx(train_losses(straight), rel=1e-5)
    assert first["final_valid_loss"] < first["initial_valid_loss"] - 0.5
    assert read_meta(resolve_checkpoint(straight)).lora == LORA.describe()
    for other in ("lora.rank=8", "lora.rank=0"):
        refused = run_recipe("demo", [*RUN, other, "trainer.max_steps=40", f"output_dir={straight}"])
        assert refused.returncode != 0
        assert "lora.rank" in refused.stderr and "LoRA adapters {'rank': 4" in refused.stderr, refused.stderr[-2000:]


def test_lora_runs_build_the_local_layers_and_refuse_transformer_engines(monkeypatch) -> None:
    """TE fuses the input norm into linear_qkv / linear_fc1, so a hook on them would see the un-normalised input:
    where `auto` would pick TE (NGC containers), a LoRA run trains the local layers; asking for TE by name is
    refused, naming the key and the values that work."""
    from steerlm.config import validation

    monkeypatch.setattr(validation, "transformer_engine_available", lambda: True)
    cfg = TrainConfig(lora=LoraConfig(rank=4))
    cuda = validation.Accelerator.cuda
    assert validation.resolve_transformer_impl(cfg.model, cuda) == TransformerImpl.transformer_engine
    assert validation.training_model(cfg.model, cfg.lora).transformer_impl == TransformerImpl.local
    assert validation.training_model(cfg.model, LoraConfig()) == cfg.model  # full fine-tuning: TE where installed
    cfg.validate(1, cuda)
    explicit = replace(cfg, model=replace(cfg.model, transformer_impl=TransformerImpl.transformer_engine))
    for this_machine in (True, False):
        with pytest.raises(ConfigError) as error:
            validation.validate_train_config(explicit, 1, cuda, this_machine)
        assert error.value.key == "model.transformer_impl" and "auto or local" in str(error.value)


@pytest.mark.slow
def test_the_training_benchmark_compares_lora_with_peft_and_with_full_fine_tuning(tmp_path: Path) -> None:
    """`bench/train_throughput.py --lora-rank`: steerlm's LoRA step, HF's with PEFT and steerlm's full step."""
    import subprocess
    import sys

    from tests.recipe_runner import ROOT, recipe_env

    out = tmp_path / "lora.json"
    args = ["--preset", "tiny", "--seq-length", "32", "--dtype", "fp32", "--warmup", "1", "--steps", "1"]
    command = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), *args, "--rounds", "1"]
    result = subprocess.run(
        [*command, "--lora-rank", "2", "--json", str(out)], cwd=ROOT, env=recipe_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert measured["lora_rank"] == 2 and {"hf", "steerlm", "full"} <= set(measured)
    assert all(measured[side]["seconds"] > 0 for side in ("hf", "steerlm", "full"))
    assert "ratio steerlm LoRA / steerlm full fine-tuning" in result.stdout


def test_a_peft_export_refused_for_its_chat_template_leaves_nothing(layout, saved: dict, tmp_path: Path) -> None:
    """The tokenizer and its template are checked before any weight is read; a refusal removes the partial export
    (and at more ranks reaches every rank, as the HF export's does)."""
    out = tmp_path / "adapter"
    cfg = ConvertConfig(input=str(saved["run"]), output=str(out), to=ModelFormat.peft, attributes={"creativity": 2.0})
    cfg.validate()
    with pytest.raises(ConfigError) as error:
        convert(cfg, layout)
    assert error.value.key.startswith("attributes") and "creativity" in str(error.value)
    assert not out.exists() and not (tmp_path / ".adapter.partial").exists()


@pytest.mark.slow
def test_a_bf16_lora_run_resumes_on_its_loss_curve(tmp_path: Path) -> None:
    """Under bf16 the adapters are bf16 parameters with fp32 master copies (Float16Module wraps the adapted model):
    10 steps, a checkpoint and 10 more follow 20 straight steps."""
    common = ["lora.rank=4", "lora.alpha=8", "trainer.log_interval=5", "trainer.eval_interval=10", "precision=bf16"]
    common += ["trainer.micro_batch_size=8", "trainer.global_batch_size=8", "checkpoint.save_interval=10"]
    common += ["optim.lr_decay_steps=20"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for steps, out in ((20, straight), (10, resumed), (20, resumed)):
        result = run_recipe("demo", [*common, f"trainer.max_steps={steps}", f"output_dir={out}"])
        assert result.returncode == 0, result.stderr[-3000:]
    assert summary(resumed)["start_step"] == 10
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=2e-3)
    assert summary(straight)["final_valid_loss"] < summary(straight)["initial_valid_loss"] - 0.5


@pytest.mark.slow
def test_a_lora_dropout_run_resumes_exactly(tmp_path: Path) -> None:
    """The dropout masks come from the default RNG, which a checkpoint restores at its own layout: 10 steps, a
    checkpoint and 10 more draw the masks of 20 straight steps (and the masks do change the losses)."""
    common = ["lora.rank=4", "lora.alpha=8", "trainer.log_interval=5", "trainer.eval_interval=20"]
    common += ["optim.lr_decay_steps=20", "checkpoint.save_interval=10"]
    runs = {name: tmp_path / name for name in ("straight", "resumed", "undropped")}
    for steps, out, extra in (
        (20, runs["straight"], ["lora.dropout=0.2"]),
        (10, runs["resumed"], ["lora.dropout=0.2"]),
        (20, runs["resumed"], ["lora.dropout=0.2"]),
        (20, runs["undropped"], []),
    ):
        result = run_recipe("demo", [*common, *extra, f"trainer.max_steps={steps}", f"output_dir={out}"])
        assert result.returncode == 0, result.stderr[-3000:]
    assert summary(runs["resumed"])["start_step"] == 10
    assert train_losses(runs["resumed"]) == pytest.approx(train_losses(runs["straight"]), rel=1e-6)
    assert train_losses(runs["straight"]) != pytest.approx(train_losses(runs["undropped"]), rel=1e-6)
