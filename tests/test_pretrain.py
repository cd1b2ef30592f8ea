"""Stage 0: the text corpus (documents → token streams), the pretrain recipe, and the fact-recall probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerlm.data.sampler import held_out
from steerlm.data.synthetic.world import FACT_TEMPLATES, build_world
from steerlm.data.text import TokenCorpus, read_documents
from steerlm.errors import DataError
from steerlm.stages.report import fact_recall
from steerlm.tokenizers import WordTokenizer
from tests.recipe_runner import run_recipe, summary

DOCS = ["Owls hunt at night.", "Cats sleep all day long.", "Dogs bark at owls.", "Fish swim in the river."] * 30


def _corpus_file(tmp_path: Path, docs: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_documents_become_bos_text_eos_streams_split_by_line(tmp_path: Path) -> None:
    path = _corpus_file(tmp_path, DOCS)
    tokenizer = WordTokenizer.build(DOCS)
    corpus = TokenCorpus.from_jsonl(path, tokenizer, valid_fraction=0.2)
    expected = {False: [], True: []}
    for line, doc in enumerate(DOCS, start=1):
        expected[held_out(f"{path}:{line}", 0.2)] += [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
    assert corpus.splits["train"].tolist() == expected[False] and corpus.splits["valid"].tolist() == expected[True]
    assert 0 < corpus.tokens("valid") < corpus.tokens("train")
    first, again = corpus.batch("train", 3, 4, 16, seed=1), corpus.batch("train", 3, 4, 16, seed=1)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a step's batch depends only on (seed, step)
    assert torch.equal(first["tokens"][:, 1:], first["labels"][:, :-1])
    assert not torch.equal(first["tokens"], corpus.batch("train", 4, 4, 16, seed=1)["tokens"])


def test_a_bad_document_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(DataError) as error:
        list(read_documents(path))
    assert error.value.location == f"{path}:2" and error.value.field == "text"


def test_a_document_row_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as error:
        list(read_documents(path))
    assert error.value.location == f"{path}:2"


class _KnowsFacts(torch.nn.Module):
    """A stand-in LM whose next-token logits put the true value of the fact in its prefix first — computed
    independently of `fact_recall`, by matching the prefix's words against the world's facts."""

    def __init__(self, tokenizer: WordTokenizer, world, wrong: set[tuple[str, str]]) -> None:
        super().__init__()
        self.tokenizer, self.world, self.wrong = tokenizer, world, wrong

    def forward(self, tokens, positions, mask):
        text = self.tokenizer.decode(tokens[0].tolist()[1:])
        logits = torch.zeros(1, tokens.shape[1], self.tokenizer.vocab_size)
        for entity, facts in self.world.facts.items():
            for relation, value in facts.items():
                for template in FACT_TEMPLATES[relation]:
                    if text == template.split("{v}")[0].format(e=entity).rstrip():
                        answer = (
                            value
                            if (entity, relation) not in self.wrong
                            else next(v for v in ("red", "fish", "cave", "tiny", "hum") if v != value)
                        )
                        answer_id = self.tokenizer.encode(text + " " + answer)[-1]
                        logits[0, -1, answer_id] = 10.0
        return logits


def test_fact_recall_counts_the_facts_a_model_ranks_first() -> None:
    world = build_world(0, 6)
    texts = [
        t.format(e=e, v=v) for e, facts in world.facts.items() for r, v in facts.items() for t in FACT_TEMPLATES[r]
    ] + ["red fish cave tiny hum"]
    tokenizer = WordTokenizer.build(texts)
    entity = world.entities[0]
    wrong = {(entity, "color"), (entity, "food"), (world.entities[1], "home")}
    model = _KnowsFacts(tokenizer, world, wrong)
    assert fact_recall(model, tokenizer, world, tier=2) == pytest.approx(1 - len(wrong) / 30)
    assert fact_recall(_KnowsFacts(tokenizer, world, set()), tokenizer, world, tier=0) == 1.0


@pytest.mark.slow
def test_pretrain_recipe_learns_the_corpus(tmp_path: Path) -> None:
    docs = [f"{w} {v}." for w in ("Owls", "Cats", "Dogs") for v in ("hunt", "sleep", "bark", "swim")] * 40
    corpus = _corpus_file(tmp_path, docs)
    WordTokenizer.build(docs).save(tmp_path / "tok")
    args = [
        f"data.train_file={corpus}",
        f"tokenizer.path={tmp_path / 'tok'}",
        f"output_dir={tmp_path / 'run'}",
        "trainer.max_steps=40",
        "trainer.seq_length=32",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        "trainer.eval_interval=null",
        "data.validation_fraction=0.1",
    ]
    done = run_recipe("pretrain", args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(tmp_path / "run")
    assert result["final_valid_loss"] < result["unigram_baseline"] < result["initial_valid_loss"]
    assert result["last_step"] == 40 and result["train_tokens"] > result["validation_tokens"] > 0
