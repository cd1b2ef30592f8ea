"""`recipes/convert.py to=nemo`: steerlm checkpoints out as NeMo 1.x `.nemo` archives.

The source is a tiny Hugging Face Llama written as a NeMo archive by tests/nemo_archives.py's own record of NeMo's
layout and imported; its export must hold exactly those tensors under NeMo's keys (read back here by megatron's
loader with this file's own requests, as NeMo's restore reads them, every Transformer Engine `_extra_state` a TE
model asks for included), a config from which NeMo's rules rebuild the model and its vocabulary rows, and import
back to the Llama's logits. Exports at TP=2 and PP=2 hold the same tensors; a regression APM becomes NeMo-Aligner's
regression reward model (`rm_head`, `output_layer`) with the same scores; a model on steerlm's word tokenizer
carries it as a Hugging Face directory that tokenises as steerlm does; bad requests are refused naming the key.
"""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from steerlm import runtime
from steerlm.checkpoint.sharded import load_weights, resolve_checkpoint
from steerlm.config import ConfigError, ParallelConfig, PrecisionConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.schema import DType
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.inference.loading import load_generator, read_checkpoint_setup, setup_tokenizer
from steerlm.inference.scoring import open_apm_checkpoint
from steerlm.inference.steering import Steering
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.nemo_archive import NemoArchive
from steerlm.models.nemo_config import nemo_model, nemo_model_config, nemo_vocab_multiple
from steerlm.stages.convert import convert
from steerlm.stages.export_files import steerlm_prompt_ids
from steerlm.stages.nemo_import import import_nemo
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed
from tests.nemo_archives import (
    ATTRIBUTES,
    LAYERS,
    ROWS,
    VOCAB,
    nemo_config,
    nemo_tensors,
    nemotron,
    nemotron_config,
    qwen2,
    qwen2_config,
    sentencepiece_model,
    to_tar,
    write_distributed,
)
from tests.nemo_archives import llama as source_llama

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

# What a Transformer Engine model asks for besides the weights, by TE version (none of it saved by the local layers
# but the four linears'): every one must be in the archive, or NeMo's strict restore fails.
TE_EXTRA_STATES = [
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "self_attention.core_attention",
    "self_attention.core_attention.fused_attention",
]


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def _convert(input: Path, output: Path, **options) -> ConvertConfig:
    cfg = ConvertConfig(input=str(input), output=str(output), to=ModelFormat.nemo, **options)
    cfg.validate()
    return cfg


def _exports(jobs: list[tuple[str, str, int, int]]) -> None:
    for input, output, tp, pp in jobs:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        layout = runtime.initialize(parallel, seed=0)
        convert(_convert(Path(input), Path(output), parallel=parallel), layout)
        runtime.shutdown(destroy_process_group=False)
    runtime.shutdown()


@pytest.fixture(scope="module")
def llama():
    return source_llama()


@pytest.fixture(scope="module")
def sources(layout, llama, tmp_path_factory) -> dict[str, Path]:
    """steerlm checkpoints imported from the tests' NeMo archives (a language model, a reward model) and the
    language model's export at one rank."""
    root = tmp_path_factory.mktemp("nemo_export")
    lm = to_tar(write_distributed(root / "lm_src", nemo_tensors(llama, True, False), nemo_config()))
    rm = to_tar(write_distributed(root / "rm_src", nemo_tensors(llama, True, True), nemo_config(head=True)))
    import_nemo(lm, root / "lm", layout)
    import_nemo(rm, root / "rm", layout)
    convert(_convert(root / "lm", root / "lm.nemo"), layout)
    return {"root": root, "lm": root / "lm", "rm": root / "rm", "export": root / "lm.nemo"}


def _nemo_key(name: str) -> tuple[str, int | None]:
    """NeMo's checkpoint key of a full-model tensor name (tests/nemo_archives.py's), and its layer."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return "model.decoder.layers." + ".".join(parts[3:]), int(parts[2])
    return "model." + name, None


def _read_archive(path: Path, expected: dict[str, torch.Tensor], tmp: Path) -> dict[str, torch.Tensor]:
    """The archive's tensors, requested as NeMo's restore requests them (layers stacked along a leading axis) at
    the shapes of `expected`, plus every TE `_extra_state` object; asserts the objects hold None."""
    if path.is_dir():  # the extracted form
        tmp = path
    else:
        with tarfile.open(path, "r:") as tar:  # uncompressed, as NeMo's save_to writes it
            tar.extractall(tmp, filter="data")
    stacked: dict[str, list] = {}
    for name, tensor in expected.items():
        key, layer = _nemo_key(name)
        stacked.setdefault(key, []).append((layer, tensor))
    request: dict = {}
    for key, parts in stacked.items():
        full = parts[0][1] if parts[0][0] is None else torch.stack([t for _, t in sorted(parts, key=lambda p: p[0])])
        request[key] = ShardedTensor.from_rank_offsets(key, torch.empty_like(full), replica_id=0)
    for module in TE_EXTRA_STATES:
        for layer in range(LAYERS):
            key = f"model.decoder.layers.{module}._extra_state"
            request[f"{key}.{layer}"] = ShardedObject(key, "unset", (LAYERS,), (layer,), replica_id=0)
    final = "model.decoder.final_layernorm._extra_state"
    request[final] = ShardedObject(final, "unset", (1,), (0,), replica_id=0)
    loaded = dist_checkpointing.load(request, str(tmp / "model_weights"))
    assert all(value is None for key, value in loaded.items() if "_extra_state" in key)
    return {key: value for key, value in loaded.items() if "_extra_state" not in key}


def _expected(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    for name, tensor in full.items():
        key, layer = _nemo_key(name)
        out.setdefault(key, []).append((layer, tensor))
    return {
        key: parts[0][1] if parts[0][0] is None else torch.stack([t for _, t in sorted(parts, key=lambda p: p[0])])
        for key, parts in out.items()
    }


def _config(path: Path) -> dict:
    with NemoArchive(path) as archive:
        return archive.read_config()


def _nemo_padded_vocab(config: dict, tokenizer_ids: int) -> int:
    """NeMo's MegatronBaseModel._vocab_size_with_padding (override_vocab_size wins)."""
    if config.get("override_vocab_size"):
        return config["override_vocab_size"]
    multiple = config["make_vocab_size_divisible_by"] * config["tensor_model_parallel_size"]
    return -(-tokenizer_ids // multiple) * multiple


def test_export_holds_nemos_tensors_and_imports_back(layout, llama, sources, tmp_path: Path) -> None:
    full = nemo_tensors(llama, True, False)
    tensors = _read_archive(sources["export"], full, tmp_path / "x")
    expected = _expected(full)
    assert sorted(tensors) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(tensors[key], tensor), key
    config = _config(sources["export"])
    assert config["mcore_gpt"] is True and config["transformer_engine"] is True
    assert config["activation"] == "fast-swiglu" and config["tokenizer"]["library"] == "sentencepiece"
    rebuilt, model = nemo_model(config, "export", ROWS).model, read_checkpoint_setup(str(sources["lm"])).model
    assert rebuilt.padded_vocab_size == model.padded_vocab_size == ROWS  # the multiple is NeMo's, chosen below
    assert rebuilt == replace(model, name="nemo", make_vocab_size_divisible_by=rebuilt.make_vocab_size_divisible_by)
    spm = __import__("sentencepiece").SentencePieceProcessor(model_proto=sentencepiece_model())
    assert _nemo_padded_vocab(config, spm.get_piece_size()) == ROWS
    with NemoArchive(sources["export"]) as archive:
        member = archive.artifact(config["tokenizer"]["model"])
        with archive.open(member) as handle:
            assert handle.read() == sentencepiece_model()
    back = tmp_path / "back"
    import_nemo(sources["export"], back, layout)
    loaded = load_generator(str(back), layout, PrecisionConfig())
    tokens = _tokens()
    with torch.no_grad():
        logits = loaded.generator.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]
        torch.testing.assert_close(logits, llama(tokens).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["nemotron", "qwen2"])
def test_nemotron_and_qwen2_export_with_nemos_tensors_and_keys(layout, tmp_path: Path, family: str) -> None:
    """A Nemotron (Qwen2) imported from an archive written from transformers' NemotronForCausalLM (Qwen2ForCausalLM)
    exports back with NeMo's keys (the zero-centred norms' weights and biases fused into the linears, as TE's spec
    holds them; Qwen2's q/k/v biases in `linear_qkv.bias`), NeMo's `layernorm1p` / `squared-relu` /
    `rotary_percentage` (`qkv_bias`), and imports again with the source's logits."""
    source, config_of = (nemotron(), nemotron_config) if family == "nemotron" else (qwen2(), qwen2_config)
    full = nemo_tensors(source, True, False)
    import_nemo(to_tar(write_distributed(tmp_path / "src", full, config_of())), tmp_path / "lm", layout)
    convert(_convert(tmp_path / "lm", tmp_path / "lm.nemo"), layout)
    tensors, expected = _read_archive(tmp_path / "lm.nemo", full, tmp_path / "x"), _expected(full)
    assert sorted(tensors) == sorted(expected)
    assert any(("layer_norm_bias" if family == "nemotron" else "linear_qkv.bias") in key for key in expected)
    assert all(torch.equal(tensors[key], tensor) for key, tensor in expected.items())
    config = _config(tmp_path / "lm.nemo")
    wanted = (
        ("layernorm1p", "squared-relu", 0.5, False) if family == "nemotron" else ("rmsnorm", "fast-swiglu", 1.0, True)
    )
    assert (config["normalization"], config["activation"], config["rotary_percentage"], config["qkv_bias"]) == wanted
    assert config["bias"] is False
    import_nemo(tmp_path / "lm.nemo", tmp_path / "back", layout)
    loaded = load_generator(str(tmp_path / "back"), layout, PrecisionConfig())
    tokens = _tokens()
    with torch.no_grad():
        logits = loaded.generator.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]
        torch.testing.assert_close(logits, source(tokens).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_exports_at_tp2_and_pp2_hold_the_same_tensors(llama, sources, tmp_path: Path) -> None:
    root = sources["root"]
    jobs = [(str(sources["lm"]), str(root / "tp2.nemo"), 2, 1), (str(sources["lm"]), str(root / "pp2.nemo"), 1, 2)]
    run_distributed(_exports, 2, jobs)
    full = nemo_tensors(llama, True, False)
    one = _read_archive(sources["export"], full, tmp_path / "one")
    for name, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        config = _config(root / f"{name}.nemo")
        assert (config["tensor_model_parallel_size"], config["pipeline_model_parallel_size"]) == (tp, pp)
        assert _nemo_padded_vocab(config, 40) == ROWS
        tensors = _read_archive(root / f"{name}.nemo", full, tmp_path / name)
        assert sorted(tensors) == sorted(one) and all(torch.equal(tensors[k], one[k]) for k in one)


def test_an_output_not_named_nemo_is_the_extracted_directory(layout, llama, sources, tmp_path: Path) -> None:
    """`output=<dir>`: the files the `.nemo` tar holds, in the directory NeMo extracts it to (restored in place, no
    second copy of the weights); steerlm serves it in place too."""
    directory = tmp_path / "lm_dir"
    convert(_convert(sources["lm"], directory), layout)
    (tmp_path / "made.nemo").mkdir()  # an empty directory named .nemo, made beforehand, becomes the tar
    convert(_convert(sources["lm"], tmp_path / "made.nemo"), layout)
    assert tarfile.is_tarfile(tmp_path / "made.nemo")
    with NemoArchive(sources["export"]) as archive, NemoArchive(directory) as extracted:
        assert archive.names() == extracted.names()
    full = nemo_tensors(llama, True, False)
    tensors, expected = _read_archive(directory, full, tmp_path / "unused"), _expected(full)
    assert all(torch.equal(tensors[key], tensor) for key, tensor in expected.items())
    loaded = load_generator(str(directory), layout, PrecisionConfig())
    tokens = _tokens()
    with torch.no_grad():
        logits = loaded.generator.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]
        torch.testing.assert_close(logits, llama(tokens).logits, rtol=0, atol=1e-4)


def test_regression_apm_exports_as_nemo_aligners_reward_model(layout, llama, sources, tmp_path: Path) -> None:
    archive = tmp_path / "rm.nemo"
    convert(_convert(sources["rm"], archive), layout)
    config = _config(archive)
    assert config["reward_model_type"] == "regression" and config["regression"]["num_attributes"] == ATTRIBUTES
    assert config["regression"]["merge_attributes"] is False and config["share_embeddings_and_output_weights"] is False
    assert config["output_sequence"] is False and config["use_avg_pool"] is False
    full = nemo_tensors(llama, True, True)
    tensors = _read_archive(archive, full, tmp_path / "x")
    assert tensors["model.rm_head.weight"].dtype == torch.float32
    assert all(torch.equal(tensors[key], tensor) for key, tensor in _expected(full).items())
    back = import_nemo(archive, tmp_path / "back", layout)  # the schema comes from the archive's steerlm record
    apm = open_apm_checkpoint(tmp_path / "back")
    assert apm.schema.attributes == open_apm_checkpoint(sources["rm"]).schema.attributes
    chunks = build_attribute_model_chunks(apm.config.model, PrecisionConfig(), layout, 3, ATTRIBUTES)
    load_weights(back, chunks, layout, apm.config.model)
    tokens = _tokens()
    with torch.no_grad():
        scores = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[:, -1]
        last = llama.model(tokens).last_hidden_state[:, -1]
    torch.testing.assert_close(scores, last @ full["rm_head.weight"].T + full["rm_head.bias"], rtol=0, atol=1e-4)


def test_a_tied_apm_gets_an_output_layer_and_bf16_weights(layout, tmp_path: Path) -> None:
    from tests.test_convert import SCHEMA, TIED_SCALED, _checkpoint

    run = _checkpoint(layout, tmp_path / "apm", TIED_SCALED, apm=True)
    archive = tmp_path / "apm.nemo"
    convert(_convert(run, archive, dtype=DType.bf16), layout)
    config = _config(archive)
    assert config["precision"] == "bf16" and config["scale_positional_embedding"] is True
    assert config["share_embeddings_and_output_weights"] is False  # NeMo-Aligner's reward model never ties
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    rows, hidden = TIED_SCALED.padded_vocab_size, TIED_SCALED.hidden_size
    request = {
        key: ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        for key, shape, dtype in (
            ("model.embedding.word_embeddings.weight", (rows, hidden), torch.bfloat16),
            ("model.output_layer.weight", (rows, hidden), torch.bfloat16),
            ("model.rm_head.weight", (len(SCHEMA.attributes), hidden), torch.float32),
        )
    }
    loaded = dist_checkpointing.load(request, str(tmp_path / "x" / "model_weights"))
    original = build_attribute_model_chunks(TIED_SCALED, PrecisionConfig(), layout, 1, 3)
    load_weights(resolve_checkpoint(run), original, layout, TIED_SCALED)
    ours = dict(original[0].named_parameters())
    assert torch.equal(loaded["model.rm_head.weight"], ours["attribute_head.weight"])  # fp32, as trained
    assert torch.equal(loaded["model.output_layer.weight"], ours["embedding.word_embeddings.weight"].bfloat16())
    assert torch.equal(loaded["model.output_layer.weight"], loaded["model.embedding.word_embeddings.weight"])
    back = import_nemo(archive, tmp_path / "back", layout)
    apm = open_apm_checkpoint(tmp_path / "back")
    assert list(apm.schema.attributes) == SCHEMA.attributes
    assert apm.config.model.padded_vocab_size == rows and not apm.config.model.share_embeddings_and_output_weights
    imported = build_attribute_model_chunks(apm.config.model, PrecisionConfig(dtype=DType.bf16), layout, 2, 3)
    load_weights(back, imported, layout, apm.config.model)
    theirs = dict(imported[0].named_parameters())
    assert torch.equal(theirs["output_layer.weight"], ours["embedding.word_embeddings.weight"].bfloat16())


def test_word_tokenizer_travels_as_a_hugging_face_directory(layout, tmp_path: Path) -> None:
    """An SFT model on steerlm's word tokenizer (SteerLM markers as single ids): the archive's tokenizer is a
    directory `transformers` reads into the same ids, NeMo pads it to the model's rows, and the archive served in
    place tokenises prompts as the source does."""
    from transformers import AutoTokenizer

    from tests.test_convert import TEXTS, _checkpoint

    run = _checkpoint(layout, tmp_path / "sft", TEST_MODEL)
    archive = tmp_path / "sft.nemo"
    convert(_convert(run, archive), layout)
    config = _config(archive)
    section = config["tokenizer"]
    assert section["library"] == "huggingface" and section["type"].startswith("nemo:")
    directory = tmp_path / "x"
    with NemoArchive(archive) as nemo:
        nemo.copy_out(nemo.artifact(section["type"]), directory)
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    source, served = read_checkpoint_setup(str(run)), read_checkpoint_setup(str(archive))
    words = setup_tokenizer(source)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == words.encode(text)
    assert _nemo_padded_vocab(config, len(hf)) == TEST_MODEL.padded_vocab_size
    assert served.template.config.tokenization == source.template.config.tokenization
    assert served.schema == source.schema
    messages = [{"role": "user", "content": TEXTS[0]}]
    ids = []
    for setup in (source, served):
        steering = Steering(setup.template, setup_tokenizer(setup), {}, DEFAULT_SYSTEM_PROMPT, 10_000)
        ids.append(steerlm_prompt_ids(steering, messages, {"humor": 2}))
    assert ids[0] == ids[1]


def test_bad_requests_are_refused_naming_the_key(layout, sources, tmp_path: Path) -> None:
    cases = [
        (dict(input=str(sources["export"])), "to", "already in the nemo format"),
        (dict(output=str(sources["export"])), "output", "exists"),
        (dict(attributes={"humor": 2.0}), "attributes", "has no chat template"),
    ]
    for changes, key, message in cases:
        cfg = replace(ConvertConfig(input=str(sources["lm"]), output=str(tmp_path / "m.nemo"), to=ModelFormat.nemo))
        with pytest.raises(ConfigError, match=message) as error:
            cfg = replace(cfg, **changes)
            cfg.validate()
            convert(cfg, layout)
        assert error.value.key == key
    assert not (tmp_path / "m.nemo").exists() and not list(tmp_path.glob(".m.nemo*"))


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_nemo_pads_the_vocabulary_to_the_models_rows(tp: int) -> None:
    """Whatever the tokenizer's id count and the TP size, NeMo's padding rule applied to the written config gives
    exactly the model's rows (a multiple where one exists, else `override_vocab_size`)."""
    for rows, multiple in ((384, 128), (512, 128), (32000, 128), (400, 16), (128256, 128), (768, 128)):
        model = replace(TEST_MODEL, vocab_size=rows, make_vocab_size_divisible_by=multiple)
        assert model.padded_vocab_size == rows
        for tokens in (1, 10, rows // 2, rows - 129, rows - 1, rows):
            config = nemo_model_config(
                model, tensor_parallel=tp, pipeline_parallel=1, dtype="fp32", tokenizer={}, tokenizer_ids=tokens
            )
            assert _nemo_padded_vocab(config, tokens) == rows, (rows, tokens, tp)
            assert ("override_vocab_size" in config) == (nemo_vocab_multiple(rows, tokens, tp, multiple) is None)


def test_a_hugging_face_llama_converts_to_nemo_in_one_command(layout, llama, tmp_path: Path) -> None:
    """`recipes/convert.py input=<HF Llama> to=nemo` (through a temporary steerlm checkpoint, removed): the archive
    holds the tensors tests/nemo_archives.py's own HF → NeMo mapping gives (every vocabulary row the HF model has)."""
    source = tmp_path / "hf"
    llama.save_pretrained(source)
    (source / "tokenizer.model").write_bytes(sentencepiece_model())
    (source / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}\n')
    archive = tmp_path / "llama.nemo"
    convert(_convert(source, archive), layout)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf", "llama.nemo"]
    config = _config(archive)
    rows = config.get("override_vocab_size") or _nemo_padded_vocab(config, VOCAB)
    full = nemo_tensors(llama, True, False)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # the HF rows, then steerlm's padding
        full[name] = torch.cat([full[name][:VOCAB], torch.zeros(rows - VOCAB, full[name].shape[1])])
    tensors = _read_archive(archive, full, tmp_path / "x")
    for key, tensor in _expected(full).items():
        got = tensors[key][:VOCAB] if key.endswith(("word_embeddings.weight", "output_layer.weight")) else tensors[key]
        assert torch.equal(got, tensor[:VOCAB] if tensor.shape[0] == rows else tensor), key
