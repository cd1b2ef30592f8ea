"""`template.tokenization`: NeMo-Aligner's ids and loss mask (`nemo`), and segments in context (`markers`).

Two tokenizers are built here, offline: a SentencePiece model (byte fallback, as Llama-2's) trained with the
`sentencepiece` package and served through transformers' LlamaTokenizer, and a byte-level BPE trained with
`tokenizers`. NeMo's rule is written out again below from NeMo's chat-SFT dataset (`preprocess`,
`_mask_targets`), on NeMo's own input (the conversation JSONL object) and the raw tokenizer libraries NeMo calls
(`sentencepiece` for a SentencePiece model, the HF tokenizer for the rest), and steerlm must agree id for id.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import conversation_example, encode_after, prompt_ids, tokenize
from steerlm.data.records import Conversation, Role, Turn, to_conversation_json
from steerlm.data.template import Segment, SteerLMTemplate, TemplateConfig, Tokenization
from steerlm.errors import DataError
from steerlm.tokenizers import SPECIAL_TOKENS, HFTokenizer, load_tokenizer

SCHEMA = AttributeSchema("helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
WORDS = (
    "the a sky is blue green red name colour another one answer question user assistant model chat brief "
    "helpful polite kind short long why how what which water tree grass sun light day night yes no"
).split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ", like the sky."]))
    lines += [f"helpfulness:{v},correctness:{v},coherence:4,complexity:{v % 3},verbosity:2" for v in range(5)] * 20
    return lines


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two tokenizer directories (trained once for the module)."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    corpus = _corpus()
    sp_dir = root / "sentencepiece"
    sp_dir.mkdir()
    with open(sp_dir / "tokenizer.model", "wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model,
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe_dir = root / "byte_bpe"
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(bpe_dir)
    return {"sentencepiece": sp_dir, "byte_bpe": bpe_dir}


def _raw_encoder(kind: str, directory: Path):
    """What NeMo's tokenizer calls: sentencepiece's encode for a .model, the HF tokenizer for tokenizer.json."""
    if kind == "sentencepiece":
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        return processor.encode_as_ids
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return lambda text: raw.encode(text, add_special_tokens=False).ids


# --- NeMo's rule, from nemo/collections/nlp/data/language_modeling/megatron/gpt_sft_chat_dataset.py ---------

NEMO_TOKENS = {
    "system_turn_start": "<extra_id_0>",
    "turn_start": "<extra_id_1>",
    "label_start": "<extra_id_2>",
    "end_of_turn": "\n",
    "end_of_name": "\n",
}


def _nemo_preprocess(source: dict, encode) -> tuple[list[int], list[bool]]:
    """NeMo's `preprocess` for a VALUE_TO_TEXT row with mask=User: (input_ids, mask)."""
    tokens, prefix = NEMO_TOKENS, "\x00"
    header = f"{tokens['system_turn_start']}System{tokens['end_of_name']}{source['system']}{tokens['end_of_turn']}"
    conversation = header
    values = []
    for i, sentence in enumerate(source["conversations"]):
        label = sentence.get("label")
        value = tokens["turn_start"] + sentence["from"] + tokens["end_of_name"]
        value += tokens["label_start"] + label + tokens["end_of_name"] if isinstance(label, str) else ""
        value += sentence["value"] + tokens["end_of_turn"]
        values.append(value)
        conversation += value
        if sentence["from"] != "User" and i == len(source["conversations"]) - 1:
            conversation += tokens["turn_start"]
    input_ids = encode(conversation)
    target: list[int | None] = list(input_ids)
    header_len = len(encode(header))
    assert target[:header_len] == encode(header)

    def after_prefix(text: str) -> list[int]:
        return encode(prefix + text)[len(encode(prefix)) :]

    def find(small: list[int], large: list[int]) -> int:
        return next((i for i in range(len(large) - len(small) + 1) if large[i : i + len(small)] == small), -1)

    label_start_ids = after_prefix(tokens["label_start"])
    name_end_ids = after_prefix(tokens["end_of_name"])
    num_turn_start_tokens = len(after_prefix(tokens["turn_start"]))
    target[:header_len] = [None] * header_len
    cur = header_len
    for i, (sentence, value) in enumerate(zip(source["conversations"], values)):
        s_id = after_prefix(value)
        speaker = sentence["from"]
        skip = len(encode(prefix + tokens["turn_start"] + speaker + tokens["end_of_name"])) - len(encode(prefix))
        location = find(label_start_ids, s_id)
        if location >= 0:
            assert skip == location
            newline = find(name_end_ids, s_id[skip:])
            assert newline >= 0
            skip += newline + len(name_end_ids)
        if cur >= len(target):
            break
        span = len(s_id)
        if i == 0:
            target[cur : cur + span] = [None] * len(target[cur : cur + span])
        elif speaker == "User" and i > 1:
            target[cur + num_turn_start_tokens : cur + span] = [None] * len(
                target[cur + num_turn_start_tokens : cur + span]
            )
        elif speaker == "User":
            target[cur : cur + span] = [None] * len(target[cur : cur + span])
        else:
            target[cur : cur + skip] = [None] * len(target[cur : cur + skip])
        cur += span
    return input_ids, [t is not None for t in target]


# --- the conversation ---------------------------------------------------------------------------------------

LABELS = SCHEMA.check({"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 2})
CONVERSATION = Conversation(
    "A chat between a user and a kind model. Be brief.",
    (
        Turn(Role.user, "Name a colour of the sky."),
        Turn(Role.assistant, "Blue, like the sky.", LABELS),
        Turn(Role.user, "Another one, why?"),
        Turn(Role.assistant, " Green grass is green.", SCHEMA.check({"helpfulness": 2})),
        Turn(Role.user, "And at night?"),
        Turn(Role.assistant, "No light, no colour!", SCHEMA.check({})),  # an empty label: `<extra_id_2>\n`
    ),
    "chat.jsonl:1",
)
KINDS = ("sentencepiece", "byte_bpe")


def _template(tokenization: Tokenization, **switches: bool) -> SteerLMTemplate:
    return SteerLMTemplate(SCHEMA, TemplateConfig(tokenization=tokenization, **switches))


@pytest.mark.parametrize("kind", KINDS)
def test_nemo_ids_and_loss_mask_equal_nemos_rule(built: dict[str, Path], kind: str) -> None:
    tokenizer = load_tokenizer("hf", built[kind], markers=False)
    assert tokenizer.added_tokens == () and tokenizer.decode(tokenizer.encode(SPECIAL_TOKENS[1])) == SPECIAL_TOKENS[1]
    assert len(tokenizer.encode(SPECIAL_TOKENS[1])) > 1  # plain text, as in NeMo with a Llama vocabulary
    template = _template(Tokenization.nemo)
    example = conversation_example(template, CONVERSATION, tokenizer)
    ids, mask = _nemo_preprocess(to_conversation_json(CONVERSATION, SCHEMA), _raw_encoder(kind, built[kind]))
    assert list(example.ids) == ids
    assert list(example.trainable) == mask
    assert tokenizer.bos_id is not None and example.ids[0] != tokenizer.bos_id
    assert tokenizer.decode(example.ids) == template.render(CONVERSATION)
    trained = tokenizer.decode([i for i, t in zip(example.ids, example.trainable) if t])
    assert trained == (
        "Blue, like the sky.\n<extra_id_1> Green grass is green.\n<extra_id_1>No light, no colour!\n<extra_id_1>"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_nemo_prompt_is_the_training_prefix_and_context_answers_are_masked(built: dict[str, Path], kind: str) -> None:
    tokenizer = load_tokenizer("hf", built[kind], markers=False)
    template = _template(Tokenization.nemo)
    example = conversation_example(template, CONVERSATION, tokenizer)
    prompt = prompt_ids(template, tokenizer, CONVERSATION.system, CONVERSATION.turns[:3], CONVERSATION.turns[3].labels)
    assert tokenizer.decode(prompt) == template.inference_prompt(
        CONVERSATION.system, list(CONVERSATION.turns[:3]), CONVERSATION.turns[3].labels
    )
    assert list(example.ids[: len(prompt)]) == prompt
    unlabelled = Conversation(
        CONVERSATION.system, (*CONVERSATION.turns[:3], Turn(Role.assistant, "Green."), *CONVERSATION.turns[4:])
    )
    context_only = _template(Tokenization.nemo, train_unlabelled_responses=False)
    context = conversation_example(context_only, unlabelled, tokenizer)
    trained = tokenizer.decode([i for i, t in zip(context.ids, context.trainable) if t])
    assert trained == "Blue, like the sky.\n<extra_id_1>No light, no colour!\n<extra_id_1>"
    everything = conversation_example(_template(Tokenization.nemo, answer_only_loss=False), CONVERSATION, tokenizer)
    assert all(everything.trainable) and everything.ids == example.ids


def test_helpsteer2_history_is_masked_as_nemo_masks_it(built: dict[str, Path], tmp_path: Path) -> None:
    """The default `helpsteer2` reader keeps the packed history in the User turn: NeMo's ids and mask; the
    `helpsteer2_turns` reader trains the earlier answer too."""
    from steerlm.data.readers import DEFAULT_SYSTEM_PROMPT, DataFormat, read_records

    prompt = "Name a colour.\n<extra_id_1>Assistant\nBlue.\n<extra_id_1>User\nAnother one?"
    row = {"prompt": prompt, "response": "Green.", **{name: 2 for name in SCHEMA.attributes}}
    (tmp_path / "hs2.jsonl").write_text(json.dumps(row) + "\n")
    tokenizer = load_tokenizer("hf", built["byte_bpe"], markers=False)
    template = _template(Tokenization.nemo)
    [folded] = read_records(tmp_path / "hs2.jsonl", DataFormat.helpsteer2, SCHEMA)
    example = conversation_example(template, folded, tokenizer)
    ids, mask = _nemo_preprocess(to_conversation_json(folded, SCHEMA), _raw_encoder("byte_bpe", built["byte_bpe"]))
    assert (list(example.ids), list(example.trainable)) == (ids, mask)
    assert tokenizer.decode([i for i, t in zip(example.ids, example.trainable) if t]) == "Green.\n<extra_id_1>"
    [split] = read_records(tmp_path / "hs2.jsonl", DataFormat.helpsteer2_turns, SCHEMA)
    assert template.render(split) == template.render(folded) and folded.system == DEFAULT_SYSTEM_PROMPT
    trained = conversation_example(template, split, tokenizer)
    assert tokenizer.decode([i for i, t in zip(trained.ids, trained.trainable) if t]) == (
        "Blue.\n<extra_id_1>Green.\n<extra_id_1>"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_markers_ids_decode_to_the_rendered_text(built: dict[str, Path], kind: str) -> None:
    tokenizer = HFTokenizer(built[kind])
    template = _template(Tokenization.markers)
    segments = template.segments(CONVERSATION)
    example = conversation_example(template, CONVERSATION, tokenizer)
    assert example.ids[0] == tokenizer.bos_id and not example.trainable[0]
    assert tokenizer.decode(example.ids[1:]) == template.render(CONVERSATION)
    for marker in SPECIAL_TOKENS:
        assert tokenizer.encode(marker) == [tokenizer.token_to_id(marker)]
    trained = tokenizer.decode([i for i, t in zip(example.ids, example.trainable) if t])
    assert trained == "".join(s.text for s in segments if s.trainable)
    # each segment alone: SentencePiece's word start before "Blue" is what encoding in context removes
    alone = [i for s in segments for i in tokenizer.encode(s.text)]
    assert (tokenizer.decode(alone) == template.render(CONVERSATION)) == (kind == "byte_bpe")
    assert encode_after(tokenizer, "Assistant\n", "Blue") == tokenizer.encode("\nBlue")[len(tokenizer.encode("\n")) :]


def test_nemo_response_rows_mask_the_prompts_id_count(built: dict[str, Path]) -> None:
    """NeMo's SteerLM 2.0 rule: the joined text in one call, the prompt's own id count masked."""
    tokenizer = load_tokenizer("hf", built["sentencepiece"], markers=False)
    segments = [
        Segment("<extra_id_1>Assistant\n<extra_id_2>helpfulness:4\n", False),
        Segment("Blue.\n<extra_id_1>", True),
    ]
    example = tokenize(segments, tokenizer, Tokenization.nemo)
    encode = _raw_encoder("sentencepiece", built["sentencepiece"])
    prompt = encode(segments[0].text)
    assert list(example.ids) == encode(segments[0].text + segments[1].text)
    assert list(example.trainable) == [False] * len(prompt) + [True] * (len(example.ids) - len(prompt))


def test_nemo_refuses_a_label_start_inside_a_turn(built: dict[str, Path]) -> None:
    tokenizer = load_tokenizer("hf", built["byte_bpe"], markers=False)
    bad = Conversation("S", (Turn(Role.user, "Say <extra_id_2> please."), Turn(Role.assistant, "No.", LABELS)), "x:3")
    with pytest.raises(DataError, match=r"x:3.*conversations\[0\].*label-start"):
        conversation_example(_template(Tokenization.nemo), bad, tokenizer)


def test_word_tokenizer_has_no_plain_text_markers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need an HF tokenizer"):
        load_tokenizer("word", tmp_path, markers=False)


def test_checkpoints_carry_the_tokenization_to_generation_and_scoring(built: dict[str, Path], tmp_path: Path) -> None:
    """A run's saved config holds `template.tokenization`; loading a checkpoint for generation or scoring
    rebuilds the tokenizer and prompts with it, and continuing it in the other mode is refused."""
    from omegaconf import OmegaConf

    from steerlm.checkpoint.sharded import META
    from steerlm.config import AttributeModelConfig, ConfigError, save_resolved
    from steerlm.config.schema import TemplateOptions, TokenizerConfig, TokenizerType, TrainDataConfig
    from steerlm.config.sft import SFTConfig
    from steerlm.inference.loading import read_checkpoint_setup, setup_tokenizer
    from steerlm.inference.scoring import open_apm_checkpoint
    from steerlm.training.init_from import check_tokenization, trained_tokenization

    sections = {
        "tokenizer": TokenizerConfig(TokenizerType.hf, str(built["sentencepiece"])),
        "data": TrainDataConfig(train_file="train.jsonl"),
        "template": TemplateOptions(Tokenization.nemo),
    }
    for name, config in (("sft", SFTConfig(**sections)), ("apm", AttributeModelConfig(**sections))):
        (tmp_path / name).mkdir()
        (tmp_path / name / META).write_text("{}")
        save_resolved(config, tmp_path / name / "config.yaml")
    setup = read_checkpoint_setup(str(tmp_path / "sft"))
    assert setup.template.config.tokenization == Tokenization.nemo
    tokenizer = setup_tokenizer(setup)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.added_tokens == () and tokenizer.vocab_size == 400
    turns = CONVERSATION.turns[:1]
    prompt = prompt_ids(setup.template, tokenizer, "Be brief.", turns, LABELS)
    text = setup.template.inference_prompt("Be brief.", list(turns), LABELS)
    assert prompt == _raw_encoder("sentencepiece", built["sentencepiece"])(text)  # no BOS, one encode call
    assert open_apm_checkpoint(tmp_path / "apm").config.template.tokenization == Tokenization.nemo
    with pytest.raises(ConfigError, match="trained with template.tokenization=nemo") as error:
        check_tokenization(tmp_path / "sft", Tokenization.markers, "sft.init_from")
    assert error.value.key == "template.tokenization"
    before = OmegaConf.load(tmp_path / "sft" / "config.yaml")
    del before["template"]  # a checkpoint written before the option: markers
    assert trained_tokenization(before) == Tokenization.markers
