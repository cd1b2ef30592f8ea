""".nemo import: NeMo 1.x Megatron-GPT archives in both weight layouts (legacy `model_weights.ckpt` per TP/PP rank,
megatron's torch_dist distributed checkpoint), written at TP=2 from a tiny Hugging Face Llama with NeMo's key names by
tests/nemo_archives.py's own mapping, give that Llama's logits once imported at TP=1 and at PP=2; a NeMo-Aligner
regression reward model's head gives the same scores; a Nemotron-shaped archive (`layernorm1p`, squared ReLU, RoPE on
half of each head) gives transformers' NemotronForCausalLM's logits and a Qwen2-shaped one (`qkv_bias`)
Qwen2ForCausalLM's, and once imported the lean decoder generates what transformers generates; config values, keys and
files steerlm cannot represent are refused naming them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steerlm.checkpoint.sharded import load_weights
from steerlm.checkpoint.sources import WeightFormat
from steerlm.config import Activation, ConfigError, ModelConfig, Normalization, ParallelConfig, PrecisionConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.store import shipped_attributes
from steerlm.errors import DataError
from steerlm.inference.decoders import LeanDecoder, lean_unsupported
from steerlm.inference.generate import SamplingParams
from steerlm.inference.loading import load_generator, read_checkpoint_setup
from steerlm.inference.scoring import open_apm_checkpoint
from steerlm.models import build_model_chunks
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.nemo_config import nemo_model
from steerlm.models.nemo_weights import NemoCheckpoint, model_tensor_names
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.convert import convert
from steerlm.stages.nemo_import import import_nemo
from steerlm.training.init_from import load_init_weights, resolve_init_source
from tests.multiproc import run_distributed
from tests.nemo_archives import (
    ATTRIBUTES,
    FFN,
    GROUPS,
    HEADS,
    HIDDEN,
    LAYERS,
    ROWS,
    VOCAB,
    import_at,
    nemo_config,
    nemo_tensors,
    nemotron_config,
    qwen2_config,
    sentencepiece_model,
    to_tar,
    write_distributed,
    write_legacy,
)
from tests.nemo_archives import llama as source_llama
from tests.nemo_archives import nemotron as source_nemotron
from tests.nemo_archives import qwen2 as source_qwen2

pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def _source_logits(source) -> torch.Tensor:
    with torch.no_grad():
        return source(_tokens()).logits


def _logits(chunks: list) -> torch.Tensor:
    tokens = _tokens()
    with torch.no_grad():
        return chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]


@pytest.fixture(scope="module")
def llama():
    return source_llama()


@pytest.fixture(scope="module")
def archives(layout, llama, tmp_path_factory) -> dict[str, Path]:
    """The archives the tests read: a legacy TP=2 PP=2 language model (a tar, TE norm names), a distributed TP=2
    language model (a directory, the local spec's norm names), a distributed TP=2 reward model (a tar) and a
    legacy TP=2 reward model (a directory of `mp_rank_XX/`)."""
    root = tmp_path_factory.mktemp("nemo")
    reward = nemo_tensors(llama, True, True)
    return {
        "legacy": to_tar(write_legacy(root / "legacy", nemo_tensors(llama, True, False), nemo_config(), pipeline=2)),
        "distributed": write_distributed(root / "dist", nemo_tensors(llama, False, False), nemo_config()),
        "reward": to_tar(write_distributed(root / "rm", reward, nemo_config(head=True))),
        "reward_legacy": write_legacy(root / "rm_legacy", reward, nemo_config(head=True), pipeline=1),
    }


def _load_at_tp1(archive: Path, layout) -> tuple[ModelConfig, list]:
    """The archive's model config and its model built at `layout` (one rank) with the archive's weights."""
    with NemoCheckpoint(archive) as source:
        assert source.model.vocab_size == ROWS and source.model.padded_vocab_size == ROWS
        chunks = build_model_chunks(source.model, PrecisionConfig(), layout, seed=9)
        source.load_into(chunks, layout.tp_rank, layout.tp)
    return source.model, chunks


@pytest.mark.parametrize("kind", ["legacy", "distributed"])
def test_archive_loads_at_tp1_with_the_source_logits(layout, llama, archives, kind: str) -> None:
    _, chunks = _load_at_tp1(archives[kind], layout)
    torch.testing.assert_close(_logits(chunks), _source_logits(llama), rtol=0, atol=1e-4)


# The shapes NVIDIA's and Alibaba's NeMo models have beyond a Llama's: the source model and the archive's config.
FAMILIES = {"nemotron": (source_nemotron, nemotron_config), "qwen2": (source_qwen2, qwen2_config)}


@pytest.fixture(scope="module")
def family_archives(layout, tmp_path_factory) -> dict[str, tuple]:
    """Per family, its source model and archives: legacy TP=2 PP=2 (a tar, TE's fused norm names) and distributed
    TP=2 (a directory, the local spec's norm names). Nemotron's fc1 is squared ReLU's, not gated, so its TP slices
    are plain row blocks; Qwen2's q/k/v biases are split over TP as the rows of `linear_qkv` are."""
    out = {}
    for family, (source_model, config) in FAMILIES.items():
        source, root = source_model(), tmp_path_factory.mktemp(family)
        legacy = write_legacy(root / "legacy", nemo_tensors(source, True, False), config(), pipeline=2)
        distributed = write_distributed(root / "dist", nemo_tensors(source, False, False), config())
        out[family] = (source, {"legacy": to_tar(legacy), "distributed": distributed})
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["legacy", "distributed"])
def test_nemotron_and_qwen2_archives_load_at_tp1_with_the_source_logits(
    layout, family_archives, family: str, kind: str
) -> None:
    source, archives = family_archives[family]
    model, chunks = _load_at_tp1(archives[kind], layout)
    nemotron = family == "nemotron"
    assert model.layernorm_zero_centered_gamma is nemotron
    assert model.normalization == (Normalization.LayerNorm if nemotron else Normalization.RMSNorm)
    assert model.activation == (Activation.squared_relu if nemotron else Activation.swiglu)
    assert model.rotary_percent == (0.5 if nemotron else 1.0)
    assert not model.add_bias_linear and model.add_qkv_bias is (family == "qwen2")
    torch.testing.assert_close(_logits(chunks), _source_logits(source), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["legacy", "distributed"])
def test_imported_nemotron_and_qwen2_generate_what_transformers_generates(
    layout, family_archives, family: str, kind: str, tmp_path: Path
) -> None:
    """`import_nemo` → a steerlm checkpoint → `load_generator`: greedy decoding in the lean decoder (Nemotron:
    zero-centred norms with biases, squared ReLU, partial RoPE; Qwen2: q/k/v biases) continues prompts as
    transformers' `generate` does, among the tokenizer's ids (steerlm samples only those) and up to the generator's
    first stop token."""
    import transformers

    source, archives = family_archives[family]
    import_nemo(archives[kind], tmp_path / "imported", layout)
    loaded = load_generator(str(tmp_path / "imported"), layout, PrecisionConfig())
    generator, vocab = loaded.generator, loaded.tokenizer.vocab_size
    assert lean_unsupported(generator.model) is None and generator.decoder is LeanDecoder
    prompts = [torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 12)]
    completions = generator.generate(prompts, [SamplingParams(max_new_tokens=8)] * len(prompts))
    greedy = transformers.GenerationConfig(
        max_new_tokens=8, do_sample=False, suppress_tokens=list(range(vocab, VOCAB)), pad_token_id=0
    )
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            theirs = source.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt) :].tolist()
        stop = next((i for i, token in enumerate(theirs) if token in generator.stop_token_ids), len(theirs))
        assert completion.token_ids == theirs[:stop], (prompt, theirs)
    assert sum(len(completion.token_ids) for completion in completions) >= 8


@pytest.mark.parametrize("kind", ["reward", "reward_legacy"])
def test_reward_head_scores_equal_the_source_head(layout, llama, archives, kind: str) -> None:
    full = nemo_tensors(llama, True, True)
    with NemoCheckpoint(archives[kind]) as source:
        assert source.nemo.reward_head is not None and source.nemo.reward_head.num_attributes == ATTRIBUTES
        chunks = build_attribute_model_chunks(source.model, PrecisionConfig(), layout, 9, ATTRIBUTES)
        source.load_into(chunks, layout.tp_rank, layout.tp)
    tokens = _tokens()
    with torch.no_grad():
        scores = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[:, -1]
        last = llama.model(tokens).last_hidden_state[:, -1]
    torch.testing.assert_close(scores, last @ full["rm_head.weight"].T + full["rm_head.bias"], rtol=0, atol=1e-4)


def test_model_tensor_names_are_the_built_models(layout) -> None:
    biased = replace(ModelConfig(), normalization=Normalization.LayerNorm, add_bias_linear=True)
    for model in (ModelConfig(), biased, replace(ModelConfig(), add_qkv_bias=True)):
        chunks = build_model_chunks(model, PrecisionConfig(), layout, seed=0)
        assert sorted(model_tensor_names(model)) == sorted(name for name, _ in named_global_parameters(chunks))


@pytest.mark.slow
def test_import_at_pp2_serves_the_source_logits(layout, llama, archives, tmp_path: Path) -> None:
    """Legacy TP=2 PP=2 source → a steerlm checkpoint written by two pipeline stages → served at TP=1."""
    output = tmp_path / "imported"
    run_distributed(import_at, 2, str(archives["legacy"]), str(output), ParallelConfig(pipeline_model_parallel_size=2))
    setup = read_checkpoint_setup(str(output))
    assert setup.schema.name == "steerlm_oasst" and setup.model.vocab_size == ROWS
    loaded = load_generator(str(output), layout, PrecisionConfig())
    torch.testing.assert_close(_logits([loaded.generator.model]), _source_logits(llama), rtol=0, atol=1e-4)
    spm = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model())
    text = "the lazy dog jumps over a brown fox"
    assert loaded.tokenizer.decode(spm.encode(text)) == text


def test_reward_model_imports_as_an_attribute_model(layout, llama, archives, tmp_path: Path) -> None:
    path = import_nemo(archives["reward"], tmp_path / "apm", layout)
    apm = open_apm_checkpoint(tmp_path / "apm")
    assert apm.path == path and apm.schema.attributes[4] == "helpfulness" and apm.config.apm.merge_weights is None
    chunks = build_attribute_model_chunks(apm.config.model, PrecisionConfig(), layout, 3, ATTRIBUTES)
    load_weights(path, chunks, layout, apm.config.model)
    reference = NemoCheckpoint(archives["reward"])
    expected = build_attribute_model_chunks(reference.model, PrecisionConfig(), layout, 4, ATTRIBUTES)
    reference.load_into(expected, layout.tp_rank, layout.tp)
    tokens = _tokens()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        assert torch.equal(chunks[0](tokens, positions, None), expected[0](tokens, positions, None))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        import_nemo(archives["reward"], tmp_path / "apm", layout)


def test_convert_recipe_imports_a_nemo_archive(layout, llama, archives, tmp_path: Path) -> None:
    """`recipes/convert.py input=<x.nemo> output=<dir>` (to=steerlm by default): the checkpoint serves the source
    logits; `to=hf` in the same command (through a temporary steerlm checkpoint, removed) loads in transformers
    with them."""
    import transformers

    cfg = ConvertConfig(input=str(archives["distributed"]), output=str(tmp_path / "converted"))
    cfg.validate()
    assert cfg.target == ModelFormat.steerlm
    path = convert(cfg, layout)
    loaded = load_generator(str(tmp_path / "converted"), layout, PrecisionConfig())
    assert path.parent.parent == tmp_path / "converted"
    torch.testing.assert_close(_logits([loaded.generator.model]), _source_logits(llama), rtol=0, atol=1e-4)
    to_hf = replace(cfg, output=str(tmp_path / "hf"), to=ModelFormat.hf)
    to_hf.validate()
    convert(to_hf, layout)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "hf"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_tokens()).logits[..., :VOCAB], _source_logits(llama), rtol=0, atol=1e-4)


def test_nemo_archive_serves_in_place(layout, llama, archives) -> None:
    setup = read_checkpoint_setup(str(archives["legacy"]))
    assert Path(setup.tokenizer_config.path, "tokenizer.model").read_bytes() == sentencepiece_model()
    loaded = load_generator(str(archives["legacy"]), layout, PrecisionConfig())
    torch.testing.assert_close(_logits([loaded.generator.model]), _source_logits(llama), rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="is a NeMo-Aligner reward model"):
        read_checkpoint_setup(str(archives["reward"]))


def shipped(name: str):
    return shipped_attributes(name).schema()


def _run_model(**changes) -> ModelConfig:
    base = ModelConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=256,
        max_position_embeddings=128,
    )
    return replace(base, **changes)


def test_init_from_a_nemo_archive(layout, llama, archives) -> None:
    source = resolve_init_source("sft.init_from", str(archives["distributed"]), _run_model())
    assert source is not None and source.format == WeightFormat.nemo and not source.has_head
    chunks = build_model_chunks(_run_model(), PrecisionConfig(), layout, seed=9)
    setup = SimpleNamespace(chunks=chunks, optimizer=SimpleNamespace(reload_model_params=lambda: None))
    load_init_weights(source, setup, layout, _run_model())  # type: ignore[arg-type]
    torch.testing.assert_close(_logits(chunks), _source_logits(llama), rtol=0, atol=1e-4)
    apm = resolve_init_source("apm.init_from", str(archives["reward"]), _run_model(), shipped("steerlm_oasst"))
    assert apm is not None and apm.has_head


@pytest.mark.parametrize(
    "changes,key,fix",
    [
        ({"hidden_size": 128}, "model.hidden_size", "set model.hidden_size=64"),
        ({"num_query_groups": None}, "model.num_query_groups", "set model.num_query_groups=2"),
        ({"make_vocab_size_divisible_by": 128}, "model.vocab_size", "set model.vocab_size=512"),
    ],
)
def test_init_from_refuses_another_model(archives, changes: dict, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_init_source("sft.init_from", str(archives["distributed"]), _run_model(**changes))
    assert error.value.key == key and fix in str(error.value), str(error.value)


def test_init_from_refuses_a_reward_head_of_another_size(archives) -> None:
    with pytest.raises(
        ConfigError, match="reward model with 9 attribute outputs, this run's schema 'helpsteer2' has 5"
    ):
        resolve_init_source("apm.init_from", str(archives["reward"]), _run_model(), shipped("helpsteer2"))


@pytest.mark.parametrize(
    "changes,key,value",
    [
        ({"activation": "geglu"}, "activation", "geglu"),
        ({"position_embedding_type": "alibi"}, "position_embedding_type", "alibi"),
        (
            {"normalization": "rmsnorm", "layernorm_zero_centered_gamma": True},
            "layernorm_zero_centered_gamma",
            True,
        ),
        ({"mcore_gpt": False}, "mcore_gpt", False),
        ({"rotary_interleaved": True}, "rotary_interleaved", True),
        ({"num_moe_experts": 8}, "num_moe_experts", 8),
        ({"reward_model_type": "binary_ranking"}, "reward_model_type", "binary_ranking"),
    ],
)
def test_config_values_steerlm_cannot_represent_are_refused(changes: dict, key: str, value) -> None:
    with pytest.raises(DataError) as error:
        nemo_model(nemo_config(**changes), "x.nemo/model_config.yaml", ROWS)
    assert error.value.field == key and repr(value) in error.value.problem, str(error.value)


def test_layernorm1p_with_its_zero_centred_gamma_key_is_accepted() -> None:
    config = nemo_config(normalization="layernorm1p", layernorm_zero_centered_gamma=True)
    model = nemo_model(config, "x.nemo/model_config.yaml", ROWS).model
    assert model.normalization == Normalization.LayerNorm and model.layernorm_zero_centered_gamma is True


def test_wrong_missing_and_unreadable_weights_are_refused(layout, llama, tmp_path: Path) -> None:
    full = nemo_tensors(llama, True, False)
    extra = {**full, "decoder.layers.0.self_attention.linear_qkv.lora_a.weight": torch.zeros(2, 2)}
    with pytest.raises(DataError) as error:
        NemoCheckpoint(write_legacy(tmp_path / "extra", extra, nemo_config(), pipeline=1))
    assert error.value.field == "model.decoder.layers.0.self_attention.linear_qkv.lora_a.weight"
    missing = {name: tensor for name, tensor in full.items() if name != "decoder.layers.1.mlp.linear_fc2.weight"}
    with pytest.raises(DataError, match=r"has no tensor for decoder\.layers\.1\.mlp\.linear_fc2\.weight"):
        NemoCheckpoint(write_legacy(tmp_path / "missing", missing, nemo_config(), pipeline=1))
    biased = write_legacy(tmp_path / "biased", full, nemo_config(bias=True), pipeline=1)
    with pytest.raises(DataError, match=r"has no tensor for decoder\.layers\.0\.mlp\.linear_fc1\.bias"):
        NemoCheckpoint(biased)
    with pytest.raises(DataError) as error:
        NemoCheckpoint(write_legacy(tmp_path / "tp", full, nemo_config(tensor_model_parallel_size=4), pipeline=1))
    assert error.value.field == "tensor_model_parallel_size"
    zarr = write_legacy(tmp_path / "zarr", full, nemo_config(), pipeline=1)
    (zarr / "model_weights").mkdir()
    (zarr / "model_weights" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(DataError) as error:
        NemoCheckpoint(zarr)
    assert error.value.field == "sharded_backend" and "'zarr'" in error.value.problem
