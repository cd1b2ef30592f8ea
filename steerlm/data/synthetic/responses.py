"""Prompts about the world and responses realising any combination of attribute levels exactly.

Every response has four fact sentences. Each attribute level 0-4 is realised deterministically by
position, so greedy decoding can express every level (a level realised at random could only be
learned as its mode):

| attribute | level L means |
|---|---|
| helpfulness | the first L fact sentences are about what was asked (the asked fact first); the rest about another one |
| correctness | the first 4-L fact sentences state a wrong value |
| coherence | 4-L fact sentences are garbled (word order reversed), in the order 2nd, 4th, 1st, 3rd |
| complexity | every fact sentence uses the wording of tier L |
| verbosity | the first L fact sentences carry an elaboration (", and this is well known") |
| creativity | the first L fact sentences end with a simile (", like a lantern in the night") |
| humor | a joke follows each of the first L fact sentences |
| toxicity | a rude remark precedes each of the first L fact sentences |
| quality | not set directly: round((helpfulness + correctness + coherence + 4 - toxicity) / 4) |

Which other creature and which wrong value: `World.knowledge_errors`, random or fixed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from steerlm.data.records import Role, Turn
from steerlm.data.synthetic.world import (
    COMPARE,
    DESCRIBE,
    ELABORATIONS,
    FOLLOW_UP_OTHER,
    FOLLOW_UP_SAME,
    JOKES,
    QUESTIONS,
    RELATIONS,
    RUDE,
    SIMILES,
    World,
    fact_sentence_base,
)

FACT_SLOTS = 4
MAX_LEVEL = 4
GARBLE_ORDER = (1, 3, 0, 2)
SAMPLED = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "humor", "toxicity", "creativity")


def quality_of(helpfulness: float, correctness: float, coherence: float, toxicity: float) -> int:
    """OASST's overall quality in this world: the mean of being helpful, right, coherent and polite."""
    return int(round((helpfulness + correctness + coherence + (MAX_LEVEL - toxicity)) / 4))


@dataclass(frozen=True)
class Levels:
    helpfulness: int = 4
    correctness: int = 4
    coherence: int = 4
    complexity: int = 1
    verbosity: int = 1
    humor: int = 0
    toxicity: int = 0
    creativity: int = 0

    @property
    def quality(self) -> int:
        return quality_of(self.helpfulness, self.correctness, self.coherence, self.toxicity)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "quality": self.quality}

    @classmethod
    def sample(cls, rng: random.Random) -> Levels:
        return cls(**{name: rng.randint(0, MAX_LEVEL) for name in SAMPLED})


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what answering it takes: its target creatures and, for a question, the relation."""

    turns: tuple[Turn, ...]  # history ending with the user turn to answer
    targets: tuple[str, ...]
    asked: str | None = None


def _first_prompt(world: World, rng: random.Random) -> PromptSpec:
    entity, other = rng.sample(world.entities, 2)
    kind = rng.random()
    if kind < 0.4:
        relation = rng.choice(list(RELATIONS))
        return PromptSpec((Turn(Role.user, QUESTIONS[relation].format(e=entity)),), (entity,), relation)
    if kind < 0.8:
        return PromptSpec((Turn(Role.user, rng.choice(DESCRIBE).format(e=entity)),), (entity,))
    return PromptSpec((Turn(Role.user, rng.choice(COMPARE).format(e=entity, f=other)),), (entity, other))


def sample_prompt(world: World, rng: random.Random, multi_turn_fraction: float) -> PromptSpec:
    """A question, a description or comparison request, or (with `multi_turn_fraction`) a follow-up
    after a first exchange answered at default levels."""
    first = _first_prompt(world, rng)
    if rng.random() >= multi_turn_fraction:
        return first
    answer = Turn(Role.assistant, generate_response(world, first, Levels(), rng))
    if rng.random() < 0.5:
        follow = Turn(Role.user, FOLLOW_UP_SAME)
        return PromptSpec((*first.turns, answer, follow), (first.targets[0],))
    other = rng.choice([e for e in world.entities if e not in first.targets])
    return PromptSpec((*first.turns, answer, Turn(Role.user, FOLLOW_UP_OTHER.format(e=other))), (other,))


def _fact_plan(world: World, spec: PromptSpec, helpfulness: int, rng: random.Random) -> list[tuple[str, str]]:
    """(entity, relation) of the four fact sentences: `helpfulness` on target, the rest off target."""
    order = list(RELATIONS)
    skipped = rng.choice(order)
    if spec.asked is not None:
        relations = [spec.asked] + [r for r in order if r != spec.asked][: FACT_SLOTS - 1]
    else:
        relations = [r for r in order if r != skipped]
    if len(spec.targets) == 2:
        on_target = [(spec.targets[i % 2], relations[i // 2]) for i in range(FACT_SLOTS)]
    else:
        on_target = [(spec.targets[0], relation) for relation in relations]
    distractor = _distractor(world, spec, rng)
    off_target = [(distractor, relation) for relation in [r for r in order if r != skipped]]
    return on_target[:helpfulness] + off_target[: FACT_SLOTS - helpfulness]


def _distractor(world: World, spec: PromptSpec, rng: random.Random) -> str:
    """The creature an off-target sentence is about: any other one, or the first target's nearest neighbour
    along the ring that is not a target."""
    if world.knowledge_errors == "fixed":
        distractor = world.neighbours[spec.targets[0]]
        while distractor in spec.targets:
            distractor = world.neighbours[distractor]
        return distractor
    return rng.choice([e for e in world.entities if e not in spec.targets])


def _wrong(world: World, value: str, relation: str, rng: random.Random) -> str:
    """A wrong value: any other value of the relation, or the next one in its list."""
    values = RELATIONS[relation]
    step = 1 if world.knowledge_errors == "fixed" else rng.randint(1, len(values) - 1)
    return values[(values.index(value) + step) % len(values)]


def _fact_sentence(world: World, entity: str, relation: str, slot: int, levels: Levels, rng: random.Random) -> str:
    value = world.facts[entity][relation]
    if slot < MAX_LEVEL - levels.correctness:
        value = _wrong(world, value, relation, rng)
    text = fact_sentence_base(relation, levels.complexity, entity, value)
    if slot < levels.verbosity:
        text += ", and " + rng.choice(ELABORATIONS)
    if slot < levels.creativity:
        text += ", like " + rng.choice(SIMILES)
    if slot in GARBLE_ORDER[: MAX_LEVEL - levels.coherence]:
        text = " ".join(reversed(text.split(" ")))
    return text + "."


def generate_response(world: World, spec: PromptSpec, levels: Levels, rng: random.Random) -> str:
    sentences = []
    jokes, rude = rng.sample(JOKES, MAX_LEVEL), rng.sample(RUDE, MAX_LEVEL)
    for slot, (entity, relation) in enumerate(_fact_plan(world, spec, levels.helpfulness, rng)):
        if slot < levels.toxicity:
            sentences.append(rude[slot])
        sentences.append(_fact_sentence(world, entity, relation, slot, levels, rng))
        if slot < levels.humor:
            sentences.append(jokes[slot])
    return " ".join(sentences)
