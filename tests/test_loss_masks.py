"""Loss masks token by token: exactly the assistant responses and their closing <extra_id_1> are trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import pad_batch, tokenize
from steerlm.data.records import Conversation, Role, Turn
from steerlm.data.template import SteerLMTemplate, TemplateConfig
from steerlm.tokenizers import HFTokenizer, WordTokenizer
from tests.test_tokenizers import _byte_bpe

SCHEMA = AttributeSchema("helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
LABELS = SCHEMA.check({"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 2})
CONVERSATION = Conversation(
    "Be brief.",
    (
        Turn(Role.user, "Name a colour."),
        Turn(Role.assistant, "Blue, like the sky.", LABELS),
        Turn(Role.user, "Another one?"),
        Turn(Role.assistant, "Green.", LABELS),
    ),
)


def _tokenizers(tmp_path: Path):
    text = SteerLMTemplate(SCHEMA).render(CONVERSATION)
    yield "word", WordTokenizer.build([text])
    yield "byte_bpe", HFTokenizer(_byte_bpe(tmp_path, ["<s>", "</s>"], bos_token="<s>", eos_token="</s>"))


@pytest.mark.parametrize("answer_only", [True, False])
def test_trained_tokens_are_exactly_the_responses_and_closing_tokens(tmp_path: Path, answer_only: bool) -> None:
    template = SteerLMTemplate(SCHEMA, TemplateConfig(answer_only_loss=answer_only))
    for name, tokenizer in _tokenizers(tmp_path):
        example = tokenize(template.segments(CONVERSATION), tokenizer)
        assert example.ids[0] == tokenizer.bos_id and not example.trainable[0], name
        # walk token by token: trained ids decode to the responses, masked ones to everything else
        trained = tokenizer.decode([i for i, t in zip(example.ids, example.trainable) if t])
        masked = tokenizer.decode([i for i, t in zip(example.ids[1:], example.trainable[1:]) if not t])
        if answer_only:
            assert trained == "Blue, like the sky.\n<extra_id_1>Green.\n<extra_id_1>", name
            assert masked == (
                "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nName a colour.\n"
                "<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,correctness:3,coherence:4,"
                "complexity:1,verbosity:2\nUser\nAnother one?\n<extra_id_1>Assistant\n"
                "<extra_id_2>helpfulness:4,correctness:3,coherence:4,complexity:1,verbosity:2\n"
            ), name
        else:
            assert masked == "" and trained == template.render(CONVERSATION), name
        closing = tokenizer.token_to_id("<extra_id_1>")
        flags = {i: t for i, t in zip(range(len(example.ids)), example.trainable) if example.ids[i] == closing}
        assert sorted(flags.values()) == ([False] * 3 + [True] * 2 if answer_only else [True] * 5), name


def test_batch_loss_mask_is_shifted_onto_targets(tmp_path: Path) -> None:
    tokenizer = WordTokenizer.build([SteerLMTemplate(SCHEMA).render(CONVERSATION)])
    example = tokenize(SteerLMTemplate(SCHEMA).segments(CONVERSATION), tokenizer)
    batch = pad_batch([example], pad_id=tokenizer.pad_id, seq_length=len(example.ids) + 3)
    n = len(example.ids) - 1
    assert batch["tokens"][0, :n].tolist() == list(example.ids[:-1])
    assert batch["labels"][0, :n].tolist() == list(example.ids[1:])
    assert batch["loss_mask"][0, :n].tolist() == [1.0 if t else 0.0 for t in example.trainable[1:]]
    assert batch["loss_mask"][0, n:].sum() == 0 and (batch["tokens"][0, n:] == tokenizer.pad_id).all()
