"""Tokenizers: HF directories gain the SteerLM specials, the word tokenizer inverts its normal form."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from steerlm.tokenizers import (
    SPECIAL_TOKENS,
    VOCAB_FILE,
    HFTokenizer,
    TokenizerKind,
    WordTokenizer,
    load_tokenizer,
    normalize,
)

TEMPLATE = (
    "<extra_id_0>System\nA chat between a user and an assistant.\n<extra_id_1>User\nHello, who are you?\n"
    "<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,verbosity:1\nHi! I'm a model; ask me (anything)."
)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?",
    "helpfulness:4,correctness:3,verbosity:1",
    "a model answers the user's question in plain words.",
] * 4


# --- Hugging Face directories built offline ------------------------------------------------------------


def _save_fast(tokenizer_object, directory: Path, **special_tokens: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special_tokens).save_pretrained(directory)
    return directory


def _byte_bpe(directory: Path, special_tokens: list[str], **roles: str) -> Path:
    """A byte-level BPE (exact round trip for any text) trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return _save_fast(tokenizer, directory, **roles)


def _word_level(directory: Path, words: list[str], **roles: str) -> Path:
    """A whitespace/punctuation-split WordLevel tokenizer with exactly `words` as its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save_fast(tokenizer, directory, unk_token="[UNK]", **roles)


@pytest.fixture
def gpt2_like(tmp_path: Path) -> tuple[HFTokenizer, int]:
    """Byte-level BPE with an EOS but no pad token, and none of the specials; also its base size."""
    directory = _byte_bpe(tmp_path / "bpe", ["<|endoftext|>"], eos_token="<|endoftext|>")
    base = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    return HFTokenizer(directory), base


def test_hf_adds_missing_specials_and_grows_the_vocabulary(gpt2_like: tuple[HFTokenizer, int]) -> None:
    tokenizer, base = gpt2_like
    assert base == 300
    assert tokenizer.added_tokens == SPECIAL_TOKENS
    assert tokenizer.vocab_size == base + 3
    special_ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert sorted(special_ids) == [300, 301, 302]
    for token, token_id in zip(SPECIAL_TOKENS, special_ids):
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.decode([token_id]) == token


def test_hf_specials_are_one_id_inside_text(gpt2_like: tuple[HFTokenizer, int]) -> None:
    tokenizer, _ = gpt2_like
    ids = tokenizer.encode(TEMPLATE)
    for token in SPECIAL_TOKENS:
        assert ids.count(tokenizer.token_to_id(token)) == TEMPLATE.count(token) > 0
    glued = tokenizer.encode("x<extra_id_2>helpfulness")
    assert glued[1] == tokenizer.token_to_id("<extra_id_2>")
    assert tokenizer.decode(glued[2:]) == "helpfulness"


def test_hf_decode_inverts_encode(gpt2_like: tuple[HFTokenizer, int]) -> None:
    tokenizer, _ = gpt2_like
    for text in [TEMPLATE, "  spaces ,  kept\t\n", "unicode: café, 日本語, 🙂", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("hello world")) < len("hello world")  # merges were learnt


def test_hf_pad_falls_back_to_eos_then_extra_id_1(gpt2_like: tuple[HFTokenizer, int], tmp_path: Path) -> None:
    tokenizer, _ = gpt2_like
    assert tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.pad_id == 0
    assert tokenizer.bos_id is None
    bare = HFTokenizer(_byte_bpe(tmp_path / "bare", []))
    assert bare.eos_id is None and bare.pad_id == bare.token_to_id("<extra_id_1>") == 301


def test_hf_keeps_existing_specials_and_their_ids(tmp_path: Path) -> None:
    # "<extra_id_0>" is an ordinary vocabulary word (split by the pre-tokenizer unless registered);
    # "<extra_id_1>" is already an added token; only "<extra_id_2>" is missing.
    from tokenizers import Tokenizer

    words = ["[UNK]", "[PAD]", "hello", "world", "<extra_id_0>", "<", ">", "</s>", ","]
    directory = _word_level(tmp_path / "words", words, pad_token="[PAD]", eos_token="</s>")
    tokenizer_json = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer_json.add_special_tokens(["<extra_id_1>"])
    tokenizer_json.save(str(directory / "tokenizer.json"))

    tokenizer = HFTokenizer(directory)
    assert tokenizer.added_tokens == ("<extra_id_2>",)
    assert tokenizer.vocab_size == len(words) + 2
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [4, 9, 10]
    assert tokenizer.encode("hello<extra_id_0>world<extra_id_1><extra_id_2>") == [2, 4, 3, 9, 10]
    assert (tokenizer.pad_id, tokenizer.eos_id) == (1, 7)
    # WordLevel decodes by joining with spaces; no clean-up pass rewrites them.
    assert tokenizer.decode(tokenizer.encode("hello, world")) == "hello , world"


def test_hf_with_all_specials_reports_none_added(tmp_path: Path) -> None:
    directory = _byte_bpe(tmp_path / "full", ["<|endoftext|>", *SPECIAL_TOKENS], eos_token="<|endoftext|>")
    tokenizer = HFTokenizer(directory)
    assert tokenizer.added_tokens == ()
    assert tokenizer.vocab_size == 300
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [1, 2, 3]
    assert tokenizer.encode("a<extra_id_1>b").count(2) == 1


def test_hf_encode_never_adds_bos_or_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, processors

    words = ["[UNK]", "<s>", "</s>", "hello", "world"]
    directory = _word_level(tmp_path / "bos", words, bos_token="<s>", eos_token="</s>")
    with_template = Tokenizer.from_file(str(directory / "tokenizer.json"))
    with_template.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    assert with_template.encode("hello world").ids == [1, 3, 4, 2]
    with_template.save(str(directory / "tokenizer.json"))

    tokenizer = HFTokenizer(directory)
    assert tokenizer.encode("hello world") == [3, 4]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)


def test_hf_rejects_unknown_tokens_and_ids(gpt2_like: tuple[HFTokenizer, int]) -> None:
    tokenizer, _ = gpt2_like
    with pytest.raises(KeyError, match="'<nope>' is not in the tokenizer's vocabulary"):
        tokenizer.token_to_id("<nope>")
    with pytest.raises(ValueError, match=r"token id 303 at position 1 .*\[0, 303\)"):
        tokenizer.decode([0, 303])


def test_hf_loads_a_sentencepiece_model(tmp_path: Path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog hello world model answer".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=40,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))

    tokenizer = HFTokenizer(directory)
    assert tokenizer.added_tokens == SPECIAL_TOKENS
    assert tokenizer.vocab_size == 43
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    text = "the lazy dog jumps over a brown fox"
    assert tokenizer.encode(text)[0] not in (1, 2)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("hello<extra_id_0>world <extra_id_2>model")
    assert ids.count(40) == 1 and ids.count(42) == 1
    assert tokenizer.decode(ids).count("<extra_id_0>") == 1


# --- the word tokenizer ----------------------------------------------------------------------------------


def test_word_reserved_ids() -> None:
    tokenizer = WordTokenizer.build(["hello world", "s"])
    reserved = ["<pad>", "<unk>", "<s>", "</s>", *SPECIAL_TOKENS]
    assert [tokenizer.token_to_id(token) for token in reserved] == list(range(7))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.encode("hello world") == [tokenizer.token_to_id("hello"), tokenizer.token_to_id(" world")]
    assert tokenizer.encode("<s>hello</s>")[:2] == [tokenizer.token_to_id("<"), tokenizer.token_to_id("s")]
    assert tokenizer.decode(tokenizer.encode("<s>hello</s>")) == "<s>hello</s>"


def test_word_template_round_trips_with_one_id_per_special() -> None:
    tokenizer = WordTokenizer.build([TEMPLATE])
    ids = tokenizer.encode(TEMPLATE)
    assert ids.count(4) == 1 and ids.count(5) == 2 and ids.count(6) == 1
    assert 1 not in ids
    assert tokenizer.decode(ids) == TEMPLATE
    glued = "<extra_id_2>helpfulness:4,verbosity:1\nHi"
    assert [tokenizer.decode([i]) for i in tokenizer.encode(glued)] == [
        "<extra_id_2>",
        "helpfulness",
        ":",
        "4",
        ",",
        "verbosity",
        ":",
        "1",
        "\n",
        "Hi",
    ]


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("a  b\t\tc", "a b c"),
        ("  line one  \n\t line two \n", "line one\nline two\n"),
        ("wait , what ?! yes ; no : maybe .", "wait, what?! yes; no: maybe."),
        ("a\r\nb\u00a0c", "a\nb c"),
        ("hi <extra_id_1> there", "hi<extra_id_1> there"),
        ("(glued)and spaced ( tokens )", "(glued)and spaced ( tokens )"),
        ("\n\n", "\n\n"),
    ],
)
def test_normalize(text: str, normal: str) -> None:
    assert normalize(text) == normal
    assert normalize(normal) == normal


def _random_text(rng: random.Random, pieces: list[str]) -> str:
    gaps = ["", "", " ", "  ", "\t", "\n", " \n ", "\r\n"]
    return "".join(rng.choice(gaps) + rng.choice(pieces) for _ in range(rng.randint(0, 30))) + rng.choice(gaps)


def test_word_decode_inverts_encode_on_normal_forms() -> None:
    pieces = [
        "word",
        "Hi",
        "don't",
        "re-enter",
        "42",
        "café",
        "日本語",
        "Größe",
        ",",
        ".",
        "?",
        ":",
        "(",
        ")",
        '"',
        "—",
        "«",
        *SPECIAL_TOKENS,
    ]
    rng = random.Random(1234)
    texts = [_random_text(rng, pieces) for _ in range(400)]
    tokenizer = WordTokenizer.build(texts)
    for text in texts:
        ids = tokenizer.encode(text)
        assert 1 not in ids, text
        assert tokenizer.decode(ids) == normalize(text), text
        assert tokenizer.encode(normalize(text)) == ids
        assert normalize(normalize(text)) == normalize(text)
        assert ids.count(4) == text.count("<extra_id_0>")


def test_word_unicode_words_are_single_tokens() -> None:
    tokenizer = WordTokenizer.build(["naïve café Größe привет 日本語 l'été"])
    text = "Größe, naïve привет! l'été"
    ids = tokenizer.encode(text)
    assert [tokenizer.decode([i]) for i in ids] == ["Größe", ",", " naïve", " привет", "!", " l'été"]
    assert tokenizer.decode(ids) == text


def test_word_unknown_pieces_become_unk() -> None:
    tokenizer = WordTokenizer.build(["the cat sat"])
    ids = tokenizer.encode("the dog sat, §")
    assert ids == [tokenizer.token_to_id("the"), 1, tokenizer.token_to_id(" sat"), tokenizer.token_to_id(","), 1]
    assert tokenizer.decode(ids) == "the<unk> sat,<unk>"
    with pytest.raises(KeyError, match="'dog' is not in the word vocabulary"):
        tokenizer.token_to_id("dog")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_word_build_orders_by_frequency_and_drops_rare_words() -> None:
    tokenizer = WordTokenizer.build(["b a b", "c b a"], min_count=2)
    first_word = 7 + 1 + 6 + 2 * 26  # reserved, "\n", ,.;:!? glued only, other ASCII punctuation in both forms
    assert tokenizer.vocab_size == first_word + 4
    assert [tokenizer.token_to_id(token) for token in ["b", " b", "a", " a"]] == list(range(first_word, first_word + 4))
    assert tokenizer.encode("c") == [1]
    with pytest.raises(ValueError, match="min_count must be at least 1"):
        WordTokenizer.build(["a"], min_count=0)


def test_word_save_load_round_trip(tmp_path: Path) -> None:
    tokenizer = WordTokenizer.build([TEMPLATE, "naïve café 日本語"])
    path = tokenizer.save(tmp_path / "vocab")
    assert path == tmp_path / "vocab" / VOCAB_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [VOCAB_FILE]
    loaded = WordTokenizer.load(path.parent)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(TEMPLATE) == tokenizer.encode(TEMPLATE)
    assert loaded.decode(loaded.encode("naïve café 日本語")) == "naïve café 日本語"
    assert isinstance(load_tokenizer("word", str(path.parent)), WordTokenizer)


def test_word_load_rejects_broken_files(tmp_path: Path) -> None:
    file = WordTokenizer.build(["a b"]).save(tmp_path)
    tokens = json.loads(file.read_text())["tokens"]
    file.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid UTF-8 JSON"):
        WordTokenizer.load(tmp_path)
    file.write_text(json.dumps({"format": "steerlm-word-tokenizer-v1", "tokens": tokens[1:]}))
    with pytest.raises(ValueError, match="starts with"):
        WordTokenizer.load(tmp_path)
    file.write_text(json.dumps({"format": "steerlm-word-tokenizer-v1", "tokens": [*tokens, "a"]}))
    with pytest.raises(ValueError, match="'a' appears twice"):
        WordTokenizer.load(tmp_path)
    file.write_text(json.dumps({"format": "steerlm-word-tokenizer-v1", "tokens": [*tokens, ["a"], "a  b"]}))
    with pytest.raises(ValueError, match=r"\['a'\] \(id \d+\) is not one piece"):
        WordTokenizer.load(tmp_path)
    file.write_text(json.dumps({"tokens": tokens}))
    with pytest.raises(ValueError, match="is not a steerlm-word-tokenizer-v1 file"):
        WordTokenizer.load(tmp_path)


# --- load_tokenizer -----------------------------------------------------------------------------------------


def test_load_tokenizer_dispatches(tmp_path: Path) -> None:
    directory = _byte_bpe(tmp_path / "bpe2", ["<|endoftext|>"], eos_token="<|endoftext|>")
    loaded = load_tokenizer(TokenizerKind.HF, directory)
    assert isinstance(loaded, HFTokenizer) and loaded.vocab_size == 303


def test_load_tokenizer_errors_name_the_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'; choose one of 'hf', 'word'"):
        load_tokenizer("sentencepiece", str(tmp_path))
    with pytest.raises(ValueError, match="'hf' needs a path.*tokenizer.json"):
        load_tokenizer("hf", None)
    missing = tmp_path / "missing"
    for kind in ("hf", "word"):
        with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist"):
            load_tokenizer(kind, str(missing))
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}' holds none of tokenizer.json, tokenizer.model"):
        load_tokenizer("hf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{VOCAB_FILE}' does not exist; build one with WordTokenizer"):
        load_tokenizer("word", str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"could not load a tokenizer from '{tmp_path}'"):
        load_tokenizer("hf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_tokenizer("hf", str(tmp_path / "tokenizer.json"))
