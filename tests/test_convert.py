"""`recipes/convert.py`: steerlm checkpoints out to Hugging Face and back.

Exports written at TP=2 and at PP=2 load in `transformers` unchanged and give steerlm's logits (GQA, tied
embeddings, Llama-3 RoPE scaling) and greedy generations; the files are byte-identical to a one-rank export;
export → import (at another layout) gives bitwise the same weights and config; a regression APM exports as
LlamaForSequenceClassification whose scores (plus the head's bias) equal steerlm's on a right-padded batch;
the chat template, rendered and tokenised as vLLM does, gives exactly the ids steerlm's server generates
from; and bad inputs are refused naming the tensor or key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, load_weights, resolve_checkpoint, save_checkpoint, saved_config
from steerlm.config import AttributeModelConfig, AttributesConfig, ConfigError, ParallelConfig, PrecisionConfig
from steerlm.config.convert import ConvertConfig, ModelFormat
from steerlm.config.schema import DType, TokenizerConfig, TokenizerType, TrainDataConfig
from steerlm.config.sft import SFTConfig
from steerlm.data.attribute_lines import from_json, trained_attribute_lines
from steerlm.data.readers.fields import DEFAULT_SYSTEM_PROMPT
from steerlm.data.template import SteerLMTemplate
from steerlm.inference.generate import SamplingParams
from steerlm.inference.loading import load_generator
from steerlm.inference.scoring import AttributeScorer
from steerlm.inference.steering import ChatMessage, RequestError, Steering
from steerlm.models import build_model_chunks
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.sharding import named_global_parameters
from steerlm.stages.convert import convert
from steerlm.tokenizers import WordTokenizer, load_tokenizer
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed

transformers = pytest.importorskip("transformers")

SCHEMA = AttributesConfig(name="three", attributes=["helpfulness", "verbosity", "humor"])
TEXTS = [
    "Hello there! How are you today? What is the capital of France? Paris, of course. And of Spain, please?",
    "Tell me a story about a cat. A cat sat. The end. Another one! Be kind. Use plain words. You answer briefly.",
    "System User Assistant helpfulness verbosity humor 0 1 2 3 4 : , café naïve it's x-y",
    DEFAULT_SYSTEM_PROMPT,
]
TIED_SCALED = replace(TEST_MODEL, share_embeddings_and_output_weights=True, rope_scaling=True, rope_scaling_factor=8.0)
CHATS = [
    ([{"role": "user", "content": "Hello there!"}], None),
    ([{"role": "user", "content": "Hello there!"}], {"helpfulness": 4, "humor": 0}),
    (
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris, of course."},
            {"role": "user", "content": "  And of Spain,   please ?"},
        ],
        {"verbosity": 1.0, "humor": None},
    ),
    (
        [
            {"role": "developer", "content": "Be kind."},
            {"role": "system", "content": "Use plain words.\n"},
            {"role": "user", "content": "Tell me a story about a cat."},
            {"role": "assistant", "content": " A cat sat.\n\nThe end. "},
            {"role": "user", "content": "Another one! café"},
        ],
        None,
    ),
]
# requests as NeMo-Aligner's clients write their attributes: attribute strings
STRING_CHATS = [(CHATS[1][0], "humor:0, helpfulness:4"), (CHATS[2][0], "verbosity:1,helpfulness:3")]


def _byte_level_bpe(directory: Path) -> Path:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style, with BOS) trained on TEXTS, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=alphabet)
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    return directory


def _checkpoint(layout, root: Path, model, apm: bool = False, hf_tokenizer: bool = False, prepare=None) -> Path:
    """A weights-only steerlm run (an SFT model, or a regression APM with a non-zero head bias) at `root`, with the
    word tokenizer or a byte-level BPE one; `prepare(chunks)` may change the weights before they are saved."""
    tokenizer = root.parent / ("bpe" if hf_tokenizer else "tokenizer")
    if not tokenizer.exists():
        _byte_level_bpe(tokenizer) if hf_tokenizer else WordTokenizer.build(TEXTS).save(tokenizer)
    kind = TokenizerType.hf if hf_tokenizer else TokenizerType.word
    common = {
        "model": model,
        "output_dir": str(root),
        "attributes": SCHEMA,
        "tokenizer": TokenizerConfig(kind, str(tokenizer)),
        "data": TrainDataConfig(train_file="unused.jsonl"),
    }
    if apm:
        chunks = build_attribute_model_chunks(model, PrecisionConfig(), layout, 11, 3)
        torch.nn.init.normal_(chunks[0].attribute_head.bias)
        cfg = AttributeModelConfig(**common)
    else:
        chunks = build_model_chunks(model, PrecisionConfig(), layout, 7)
        cfg = SFTConfig(**common)
    if prepare is not None:
        prepare(chunks)
    save_checkpoint(root, 5, WeightsOnly(chunks), layout, cfg)
    return root


def _convert(input: Path, output: Path, **options) -> ConvertConfig:
    cfg = ConvertConfig(input=str(input), output=str(output), **options)
    cfg.validate()
    return cfg


def _distributed_conversions(jobs: list[tuple[str, str, dict, int, int]]) -> None:
    for input, output, options, tp, pp in jobs:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        layout = runtime.initialize(parallel, seed=0)
        convert(_convert(Path(input), Path(output), parallel=parallel, **options), layout)
        runtime.shutdown(destroy_process_group=False)
    runtime.shutdown()


@pytest.fixture(scope="module")
def checkpoints(layout, tmp_path_factory) -> dict:
    """A tied + scaled-RoPE SFT model (exported at one rank) and an untied one."""
    root = tmp_path_factory.mktemp("convert")
    tied, untied = _checkpoint(layout, root / "tied", TIED_SCALED), _checkpoint(layout, root / "untied", TEST_MODEL)
    convert(_convert(tied, root / "tied_tp1"), layout)
    return {"root": root, "tied": tied, "untied": untied, "export": root / "tied_tp1"}


@pytest.fixture(scope="module")
def exported(checkpoints: dict) -> dict:
    """In one two-rank launch: the tied model exported at TP=2, the untied one at PP=2 (sharded), and that
    export imported back at TP=2."""
    root = checkpoints["root"]
    jobs = [
        (str(checkpoints["tied"]), str(root / "tied_tp2"), {}, 2, 1),
        (str(checkpoints["untied"]), str(root / "untied_pp2"), {"max_shard_size": "200KB"}, 1, 2),
        (str(root / "untied_pp2"), str(root / "untied_back"), {}, 2, 1),
    ]
    run_distributed(_distributed_conversions, 2, jobs)
    return checkpoints


def _parameters(layout, run: Path, model, dtype: DType = DType.fp32) -> dict[str, torch.Tensor]:
    chunks = build_model_chunks(model, PrecisionConfig(dtype=dtype), layout, 99)
    load_weights(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip(), chunks, layout, model)
    return {name: param.detach().clone() for name, param in named_global_parameters(chunks)}


def _steerlm_logits(layout, run: Path, model, tokens: torch.Tensor) -> torch.Tensor:
    chunks = build_model_chunks(model, PrecisionConfig(), layout, 99)
    load_weights(run / "checkpoints" / "step_0000005", chunks, layout, model)
    with torch.no_grad():
        return chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : model.vocab_size]


@pytest.mark.slow
def test_exports_at_tp2_and_pp2_give_steerlm_logits(layout, exported: dict) -> None:
    root = exported["root"]
    tokens = torch.randint(0, 150, (2, 24), generator=torch.Generator().manual_seed(3))
    for run, directory, model in (
        (exported["tied"], root / "tied_tp2", TIED_SCALED),
        (exported["untied"], root / "untied_pp2", TEST_MODEL),
    ):
        hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            hf_logits = hf(tokens).logits
        torch.testing.assert_close(hf_logits, _steerlm_logits(layout, run, model, tokens), rtol=0, atol=1e-4)
    config = json.loads((root / "tied_tp2" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["num_key_value_heads"] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    index = json.loads((root / "untied_pp2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    for file in (root / "tied_tp2").glob("*.safetensors"):  # the layout that wrote them does not show
        assert file.read_bytes() == (root / "tied_tp1" / file.name).read_bytes()


@pytest.mark.slow
def test_export_then_import_is_bitwise_identity(layout, exported: dict) -> None:
    source, back = exported["untied"], exported["root"] / "untied_back"
    before, after = _parameters(layout, source, TEST_MODEL), _parameters(layout, back, TEST_MODEL)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    meta = json.loads((back / "checkpoints" / "step_0000005" / "steerlm_checkpoint.json").read_text())
    assert meta["weights_only"] and meta["step"] == 5
    assert WordTokenizer.load(back / "tokenizer").decode(range(20)) == WordTokenizer.load(
        source.parent / "tokenizer"
    ).decode(range(20))


def _steerlm_request_ids(steering: Steering, messages: list[dict], attributes: dict | str | None) -> list[int]:
    """What steerlm's server does with a chat request (inference/server.py)."""
    labels = steering.labels(attributes)
    system, turns = steering.conversation([ChatMessage(m["role"], m["content"]) for m in messages], labels)
    return steering.prompt_ids(system, turns, labels)


@pytest.mark.parametrize("kind", ["word", "byte_level_bpe"])
def test_chat_template_gives_steerlm_prompt_ids(layout, checkpoints: dict, tmp_path: Path, kind: str) -> None:
    if kind == "word":
        directory, tokenizer = checkpoints["export"], WordTokenizer.load(checkpoints["tied"].parent / "tokenizer")
    else:
        run = _checkpoint(layout, tmp_path / "bpe_sft", replace(TEST_MODEL, vocab_size=340), hf_tokenizer=True)
        directory = tmp_path / "bpe_export"
        convert(_convert(run, directory), layout)
        tokenizer = load_tokenizer("hf", tmp_path / "bpe")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    steering = Steering(SteerLMTemplate(SCHEMA.schema()), tokenizer, {}, ConvertConfig.system_prompt, 10_000)
    for messages, attributes in [*CHATS, *STRING_CHATS]:
        extra = {} if attributes is None else {"attributes": attributes}
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        expected = _steerlm_request_ids(steering, messages, attributes)
        assert hf(text, add_special_tokens=False)["input_ids"] == expected, text
        assert hf.decode(expected) == tokenizer.decode(expected) and text.startswith("<s><extra_id_0>System")
    for bad, message in (
        ({"humor": 9}, "out of range"),
        ("humor:9", "out of range"),
        ("humor:0,humor:1", "attributes: humor is given twice"),
        ("humor=0", "attributes: 'humor=0' is not name:value"),
        ("humor:none", "attributes.humor=none is not a number"),
    ):
        with pytest.raises(Exception, match=message):
            hf.apply_chat_template(CHATS[0][0], add_generation_prompt=True, tokenize=False, attributes=bad)
        with pytest.raises(RequestError, match=message.replace("=none", "='none'")):
            steering.labels(bad)
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<extra_id_1>"), tokenizer.eos_id]


def test_greedy_generation_equals_steerlm(layout, checkpoints: dict) -> None:
    directory = checkpoints["export"]
    loaded = load_generator(str(checkpoints["tied"]), layout, PrecisionConfig())
    steering = Steering(loaded.template, loaded.tokenizer, {}, ConvertConfig.system_prompt, 10_000)
    prompt = _steerlm_request_ids(steering, *CHATS[2])
    ours = loaded.generator.generate([prompt], [SamplingParams(max_new_tokens=10)])[0].token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    assert theirs[: len(ours)] == ours and len(ours) >= 1


def test_word_tokenizer_export_gives_the_same_ids() -> None:
    tokenizer = WordTokenizer.build([*TEXTS, "héllo ÿ ǅ ½ ² 東京 😀 e\u0301"])
    exported = tokenizer.hf_tokenizer()
    for text in [
        *TEXTS,
        "  Hello   there ,how are\n you :humor:4  ",
        "<extra_id_0>System\n\n<extra_id_1>User\nhi <extra_id_1>Assistant\n<extra_id_2>humor:4\n",
        "<extra_id_2> Hello  <extra_id_1>  cat",
        "café\u00a0naïve\u3000東京\r\nit's\tx-y__z\u2028😀 e\u0301 ½",
        " \n x \n",
    ]:
        assert exported.encode(text).ids == tokenizer.encode(text), repr(text)


def test_a_steerable_export_carries_the_attribute_values_it_trained_on(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "sft", TEST_MODEL)
    convert(_convert(run, tmp_path / "plain_hf"), layout)
    assert "trained on" not in (tmp_path / "plain_hf" / "README.md").read_text()  # no lines recorded: no section
    lines = {"lines": 7, "levels": {"helpfulness": {"3": 4, "4": 3}, "verbosity": {"0": 7}, "humor": {}}}
    (run / "attribute_lines.json").write_text(json.dumps(lines))
    convert(_convert(run, tmp_path / "hf"), layout)
    assert json.loads((tmp_path / "hf" / "steerlm" / "attribute_lines.json").read_text()) == lines
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Attribute values it was trained on" in card and "Of the 7 attribute lines in its SFT data" in card
    assert "| helpfulness | 3 (4), 4 (3); never: 0, 1, 2 |" in card and "| humor | none; never: 0, 1, 2, 3, 4 |" in card
    assert "| verbosity | 0 (7); never: 1, 2, 3, 4 |" in card
    convert(_convert(tmp_path / "hf", tmp_path / "back"), layout)
    assert trained_attribute_lines(tmp_path / "back") == trained_attribute_lines(run)  # and back again


def test_to_steerlm_writes_a_copy_with_its_tokenizer_that_reads_as_the_original(layout, tmp_path: Path) -> None:
    """A steerable model and a regression APM written `to=steerlm` (once in bf16): weights-only checkpoints with the
    tokenizer and the trained attribute lines beside them, which generate and score as the originals do after the
    originals and their tokenizer are gone."""
    sft, apm = (_checkpoint(layout, tmp_path / name, TEST_MODEL, apm=name == "apm") for name in ("sft", "apm"))
    lines = {"lines": 7, "levels": {"helpfulness": {"3": 4, "4": 3}, "verbosity": {"0": 7}, "humor": {}}}
    (sft / "attribute_lines.json").write_text(json.dumps(lines))
    loaded = load_generator(str(sft), layout, PrecisionConfig())
    steering = Steering(loaded.template, loaded.tokenizer, {}, ConvertConfig.system_prompt, 10_000)
    prompt = _steerlm_request_ids(steering, *CHATS[2])
    generated = loaded.generator.generate([prompt], [SamplingParams(max_new_tokens=8)])[0].token_ids
    conversations = [[ChatMessage(**m) for m in chat[0][:-1]] for chat in CHATS[2:]]
    scorer = AttributeScorer.from_checkpoint(apm, layout)
    scored = scorer.score([steering.scoring_conversation(c) for c in conversations])
    weights = _parameters(layout, sft, TEST_MODEL)
    for run in (sft, apm):
        convert(_convert(run, tmp_path / f"{run.name}_copy", to=ModelFormat.steerlm), layout)
    convert(_convert(sft, tmp_path / "bf16", to=ModelFormat.steerlm, dtype=DType.bf16), layout)
    for run in (sft, apm, tmp_path / "tokenizer"):
        shutil.rmtree(run)
    copy = tmp_path / "sft_copy"
    assert saved_config(resolve_checkpoint(copy)).tokenizer.path == str(copy / "tokenizer")
    assert trained_attribute_lines(copy) == trained_attribute_lines(tmp_path / "bf16") == from_json(lines, "lines")
    loaded = load_generator(str(copy), layout, PrecisionConfig())
    assert loaded.generator.generate([prompt], [SamplingParams(max_new_tokens=8)])[0].token_ids == generated
    assert (
        AttributeScorer.from_checkpoint(tmp_path / "apm_copy", layout).score(
            [steering.scoring_conversation(c) for c in conversations]
        )
        == scored
    )
    assert saved_config(resolve_checkpoint(tmp_path / "bf16")).precision.dtype == "bf16"
    halved = _parameters(layout, tmp_path / "bf16", TEST_MODEL, DType.bf16)
    assert halved.keys() == weights.keys()
    assert all(halved[name].dtype == torch.bfloat16 for name in halved)
    assert all(torch.equal(halved[name], param.bfloat16()) for name, param in weights.items())


def test_regression_apm_exports_as_sequence_classification(layout, tmp_path: Path) -> None:
    run = _checkpoint(layout, tmp_path / "apm", TEST_MODEL, apm=True)
    convert(_convert(run, tmp_path / "hf"), layout)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = hf.config
    assert type(hf).__name__ == "LlamaForSequenceClassification" and config.num_labels == 3
    assert [config.id2label[i] for i in range(3)] == SCHEMA.attributes and config.pad_token_id == 0
    conversations = [chat[0][:-1] for chat in CHATS[2:]] + [[*CHATS[0][0], {"role": "assistant", "content": "Hi."}]]
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 3  # three lengths, right-padded
    with torch.no_grad():
        scores = hf(**batch).logits + torch.tensor(config.steerlm_score_bias)
    scorer = AttributeScorer.from_checkpoint(run, layout)
    steering = Steering(scorer.template, scorer.tokenizer, {}, ConvertConfig.system_prompt, 10_000)
    ours = scorer.score([steering.scoring_conversation([ChatMessage(**m) for m in c]) for c in conversations])
    expected = torch.tensor([[row[name] for name in SCHEMA.attributes] for row in ours], dtype=torch.float32)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "helpfulness, verbosity, humor" in card and "integers from 0 to 4" in card and "<extra_id_2>" in card
    convert(_convert(tmp_path / "hf", tmp_path / "back"), layout)
    chunks = [build_attribute_model_chunks(TEST_MODEL, PrecisionConfig(), layout, 1, 3) for _ in range(2)]
    load_weights(run / "checkpoints" / "step_0000005", chunks[0], layout, TEST_MODEL)
    load_weights(tmp_path / "back" / "checkpoints" / "step_0000005", chunks[1], layout, TEST_MODEL)
    pairs = zip(named_global_parameters(chunks[0]), named_global_parameters(chunks[1]))
    assert all(a == b and torch.equal(p, q) for (a, p), (b, q) in pairs)


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_bad_inputs_are_refused_naming_the_tensor_or_key(layout, checkpoints: dict, tmp_path: Path) -> None:
    source = checkpoints["export"]
    cases = {
        "architecture": ({"architectures": ["Qwen3ForCausalLM"]}, "input", "Qwen3ForCausalLM"),
        "vocabulary": ({"vocab_size": 50}, "input", "but config.json's vocab_size is 50"),
        "missing": ({}, "input", "model.layers.1.mlp.up_proj.weight"),
    }
    for name, (changes, key, needle) in cases.items():
        directory = tmp_path / name
        shutil.copytree(source, directory)
        _edit_config(directory, **changes)
        if name == "vocabulary":  # another tool's export: nothing but config.json describes the model
            shutil.rmtree(directory / "steerlm")
        if name == "missing":
            tensors = load_file(directory / "model.safetensors")
            del tensors["model.layers.1.mlp.up_proj.weight"]
            save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ConfigError) as error:
            convert(_convert(directory, tmp_path / f"{name}_out"), layout)
        assert error.value.key == key and needle in str(error.value), str(error.value)
    with pytest.raises(ConfigError, match="holds no LoRA adapters") as error:  # hf → peft, through steerlm
        convert(_convert(source, tmp_path / "peft_out", to=ModelFormat.peft), layout)
    assert error.value.key == "input" and not list(tmp_path.glob(".peft_out*"))  # the temporary checkpoint removed
    with pytest.raises(ConfigError) as error:
        _convert(checkpoints["tied"], source)
    assert error.value.key == "output"


def test_the_input_format_follows_the_rules_init_from_and_serving_use(tmp_path: Path) -> None:
    import tarfile

    from steerlm.config.convert import input_format
    from steerlm.config.sources import NEMO_CONFIG_FILE, STEERLM_CHECKPOINT_FILE, is_nemo_archive

    extracted, checkpoint, tar = tmp_path / "extracted", tmp_path / "step_0000001", tmp_path / "model.tar"
    for directory in (extracted, checkpoint):
        directory.mkdir()
        (directory / NEMO_CONFIG_FILE).write_text("num_layers: 2\n")
    (checkpoint / STEERLM_CHECKPOINT_FILE).write_text("{}")  # a steerlm checkpoint that also holds the file
    with tarfile.open(tar, "w") as archive:
        archive.add(extracted / NEMO_CONFIG_FILE, arcname=NEMO_CONFIG_FILE)
    for path, expected in (
        (extracted, ModelFormat.nemo),
        (tar, ModelFormat.nemo),  # a .nemo renamed: its contents decide, as for init_from
        (tmp_path / "missing.nemo", ModelFormat.nemo),  # the NeMo reader names what is wrong with it
        (checkpoint, ModelFormat.steerlm),
    ):
        assert input_format(path) == expected, path
        assert is_nemo_archive(path) == (expected == ModelFormat.nemo and path.exists()), path
