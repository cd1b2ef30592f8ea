"""The built-in synthetic world: levels are realised and recovered, attributes independent, files
reproducible and readable by the real readers, the oracle robust."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from steerlm.config import ConfigError, SyntheticConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.readers import DataFormat, read_records
from steerlm.data.records import Role, Turn
from steerlm.data.synthetic.corpus import encyclopedia
from steerlm.data.synthetic.oracle import ATTRIBUTES, Oracle
from steerlm.data.synthetic.responses import SAMPLED, Levels, generate_response, sample_prompt
from steerlm.data.synthetic.samples import attribute_samples
from steerlm.data.synthetic.splits import _spearman, format_synthetic_summary, write_synthetic
from steerlm.data.synthetic.world import KNOWLEDGE_ERRORS, RELATIONS, TIERS, World, build_world
from steerlm.data.template import SteerLMTemplate
from steerlm.tokenizers import WordTokenizer

SMALL = SyntheticConfig(annotated_rows=300, unlabelled_rows=1500, eval_prompts=40)
OASST = AttributeSchema("steerlm_oasst", ATTRIBUTES)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, write_synthetic(SMALL, out)


def test_every_attribute_level_is_recovered_by_the_oracle(generated) -> None:
    _, summary = generated
    for name, rho in summary["spearman_intended_vs_oracle"].items():
        assert rho >= 0.95, f"{name}: Spearman {rho:.3f}"


def test_independent_attributes_vary_independently(generated) -> None:
    _, summary = generated
    matrix = summary["oracle_correlation"]
    assert set(matrix) == set(SAMPLED)
    for a, b in itertools.combinations(SAMPLED, 2):
        assert abs(matrix[a][b]) < 0.5, f"{a} ~ {b}: {matrix[a][b]}"
    printed = format_synthetic_summary(summary)
    assert "max |r| between independent attributes" in printed and "helpfulness" in printed
    assert "40 eval prompts, random knowledge errors," in printed


@pytest.mark.parametrize("knowledge_errors", KNOWLEDGE_ERRORS)
def test_oracle_matches_the_generator_exactly_on_random_and_extreme_levels(knowledge_errors: str) -> None:
    world = build_world(3, 20, knowledge_errors)
    oracle = Oracle(world)
    rng = random.Random(0)
    extremes = [Levels(*([level] * len(SAMPLED))) for level in range(5)]
    for index in range(1500):
        spec = sample_prompt(world, rng, multi_turn_fraction=0.3)
        levels = extremes[index % 5] if index < 50 else Levels.sample(rng)
        response = generate_response(world, spec, levels, rng)
        assert oracle.parse_response(response)[3] == 0, response  # every sentence of a valid response parses
        assert oracle.score(spec.turns, response) == {k: float(v) for k, v in levels.as_dict().items()}


def _errors(world: World, count: int) -> tuple[list[int], list[tuple[str, str]]]:
    """Over `count` prompts answered at correctness 0 and helpfulness 0: each stated value's offset from the true
    one in its relation's list, and each (first target, creature talked about) pair."""
    rng = random.Random(5)
    offsets, topics = [], []
    for _ in range(count):
        spec = sample_prompt(world, rng, multi_turn_fraction=0.3)
        response = generate_response(world, spec, Levels(helpfulness=0, correctness=0), rng)
        for fact in Oracle(world).parse_response(response)[0]:
            values = RELATIONS[fact.relation]
            offsets.append((values.index(fact.value) - values.index(world.facts[fact.entity][fact.relation])) % 8)
            assert fact.entity not in spec.targets
            topics.append((spec.targets[0], fact.entity))
    return offsets, topics


def test_fixed_knowledge_errors_state_the_next_value_about_the_neighbour() -> None:
    world = build_world(3, 20, "fixed")
    ring, name = [], world.entities[0]
    while name not in ring:
        ring.append(name)
        name = world.neighbours[name]
    assert sorted(ring) == sorted(world.entities)  # one ring through every creature
    offsets, topics = _errors(world, 300)
    assert set(offsets) == {1}
    # the first target's neighbour, or the next one along the ring where the neighbour is the other target
    for target, creature in topics:
        assert creature in (world.neighbours[target], world.neighbours[world.neighbours[target]])
    assert sum(creature == world.neighbours[target] for target, creature in topics) > 0.8 * len(topics)


def test_random_knowledge_errors_have_no_most_likely_form() -> None:
    world = build_world(3, 20)
    assert world.neighbours == {} and build_world(3, 20, "fixed").facts == world.facts
    offsets, topics = _errors(world, 300)
    counts = np.bincount(offsets, minlength=8)
    assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].mean()  # every wrong value about equally often
    assert len({creature for _, creature in topics}) == 20


def test_the_encyclopedia_names_neighbours_only_with_fixed_errors() -> None:
    fixed = build_world(0, 10, "fixed")
    for paragraph, entity in zip(encyclopedia(fixed, 3, 0), fixed.entities * 3):
        assert paragraph.count("lives next to") == 1
        assert f"{entity} lives next to {fixed.neighbours[entity]}." in paragraph
        assert all(value in paragraph for value in fixed.facts[entity].values())
    assert not any("lives next to" in paragraph for paragraph in encyclopedia(build_world(0, 10), 3, 0))


def test_knowledge_errors_must_be_random_or_fixed(tmp_path: Path) -> None:
    tiny = SyntheticConfig(annotated_rows=5, unlabelled_rows=5, eval_prompts=2, knowledge_errors="fixed")
    write_synthetic(tiny, tmp_path)
    world = World(**json.loads((tmp_path / "world.json").read_text()))
    assert world == build_world(0, 60, "fixed")  # world.json keeps what the oracle and a rerun need
    with pytest.raises(ConfigError) as error:
        SyntheticConfig(knowledge_errors="sometimes").validate()
    assert "synthetic.knowledge_errors" in str(error.value) and "fixed" in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "!!!",
        "<extra_id_1>",
        "Nobody is red.",
        "Zzz eats apples.",
        "the the the",
        "apples. apples! apples?",
        "\u0000\ud7ff weird",
        "Honestly, that was a silly question.",
    ],
)
def test_oracle_scores_malformed_text_lowest_without_raising(text: str) -> None:
    world = build_world(0, 10)
    prompt = [Turn(Role.user, f"Tell me about {world.entities[0]}.")]
    scores = Oracle(world).score(prompt, text)
    assert set(scores) == set(ATTRIBUTES)
    lowest = {name: 0.0 for name in ATTRIBUTES}
    if text == "Honestly, that was a silly question.":
        lowest["toxicity"] = 1.0
    assert scores == lowest


def test_levels_change_the_text_in_the_intended_direction() -> None:
    world = build_world(0, 20)
    rng = random.Random(1)
    spec = sample_prompt(world, rng, 0.0)
    words = {
        level: len(generate_response(world, spec, Levels(verbosity=level), random.Random(2)).split())
        for level in range(5)
    }
    assert words == dict(sorted(words.items(), key=lambda item: item[1]))  # strictly longer with verbosity
    assert words[4] > words[0] + 15


def test_human_ratings_are_noisy_integers_with_explicit_missing_values(generated) -> None:
    out, _ = generated
    stats = {"missing": 0, "total": 0, "exact": 0}
    world = build_world(SMALL.seed, SMALL.num_entities)
    oracle = Oracle(world)
    for record in read_records(out / "annotated.jsonl", DataFormat.helpsteer2, OASST):
        prompt, response = record.turns[:-1], record.turns[-1]
        truth = oracle.score(prompt, response.text)
        for name, value in response.labels.items():
            stats["total"] += 1
            if value is None:
                stats["missing"] += 1
                continue
            assert value in range(5)
            stats["exact"] += value == truth[name]
    assert 0.005 < stats["missing"] / stats["total"] < 0.04  # missing_label_rate 0.02
    assert 0.8 < stats["exact"] / (stats["total"] - stats["missing"]) < 0.98  # N(0, 0.3) noise, then rounding


def test_splits_read_with_the_real_readers_and_the_tokenizer_covers_them(generated) -> None:
    out, _ = generated
    annotated = list(read_records(out / "annotated.jsonl", DataFormat.helpsteer2_turns, OASST))
    unlabelled = list(read_records(out / "unlabelled.jsonl", DataFormat.conversation, OASST))
    prompts = list(read_records(out / "eval_prompts.jsonl", DataFormat.conversation, OASST))
    assert (len(annotated), len(unlabelled), len(prompts)) == (300, 1500, 40)
    assert any(len(r.turns) == 4 for r in annotated)  # multi-turn prompts were packed and split back
    assert all(r.turns[-1].labels is None for r in unlabelled) and all("levels" in r.extra for r in unlabelled)
    assert all(r.turns[-1].role == Role.user for r in prompts)
    tokenizer = WordTokenizer.load(out / "tokenizer")
    template = SteerLMTemplate(OASST)
    unknown = tokenizer.token_to_id("<unk>")
    for record in annotated[:100] + unlabelled[:100]:
        assert unknown not in tokenizer.encode(template.render(record)), record.source
    assert tokenizer.vocab_size < 2000


def test_same_seed_same_bytes_other_seed_other_world(tmp_path: Path) -> None:
    tiny = SyntheticConfig(annotated_rows=30, unlabelled_rows=60, eval_prompts=10)
    write_synthetic(tiny, tmp_path / "a")
    write_synthetic(tiny, tmp_path / "b")
    other = SyntheticConfig(seed=1, annotated_rows=30, unlabelled_rows=60, eval_prompts=10)
    write_synthetic(other, tmp_path / "c")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (
        set(build_world(0, 60).entities).isdisjoint(build_world(1, 60).entities)
        or build_world(0, 60).entities != build_world(1, 60).entities
    )
    assert (tmp_path / "a" / "eval_prompts.jsonl").read_text() != (tmp_path / "c" / "eval_prompts.jsonl").read_text()


def test_docs_show_the_current_samples() -> None:
    assert attribute_samples() in (ROOT / "docs" / "synthetic_world.md").read_text()


def test_spearman_helper() -> None:
    a = np.array([0, 1, 2, 3, 4, 4])
    assert _spearman(a, a * 2.0) == pytest.approx(1.0)
    assert _spearman(a, -a.astype(float)) == pytest.approx(-1.0)


def test_corpus_states_every_fact_truly_in_every_tier_and_carries_conversation_text(tmp_path: Path) -> None:
    sizes = SyntheticConfig(
        annotated_rows=10, unlabelled_rows=40, eval_prompts=5, encyclopedia_paragraphs=6, corpus_conversations=25
    )
    write_synthetic(sizes, tmp_path)
    world = build_world(sizes.seed, sizes.num_entities)
    oracle = Oracle(world)
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(texts) == sizes.encyclopedia_paragraphs * sizes.num_entities + sizes.corpus_conversations
    encyclopedia = texts[: sizes.encyclopedia_paragraphs * sizes.num_entities]
    seen = set()
    for paragraph in encyclopedia:
        facts, jokes, rude, unparsed = oracle.parse_response(paragraph)
        assert (len(facts), jokes, rude, unparsed) == (5, 0, 0, 0), paragraph
        assert len({f.entity for f in facts}) == 1 and {f.relation for f in facts} == set(RELATIONS)
        assert all(world.facts[f.entity][f.relation] == f.value for f in facts)
        seen |= {(f.entity, f.relation, f.tier) for f in facts}
    assert {tier for _, _, tier in seen} == set(range(TIERS))
    unlabelled = [json.loads(line) for line in (tmp_path / "unlabelled.jsonl").read_text().splitlines()]
    for text, row in zip(texts[len(encyclopedia) :], unlabelled):
        assert text == "\n".join(turn["value"] for turn in row["conversations"])
        assert "<extra_id" not in text
