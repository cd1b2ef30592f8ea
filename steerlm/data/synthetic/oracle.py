"""The oracle: attribute scores of a response, read from the text alone.

It parses the prompt (what was asked: which creatures, which fact) and the response sentence by
sentence — fact sentences in any tier's wording, forwards or garbled (reversed), with their
elaboration and simile clauses; jokes; rude remarks — and checks facts against the world's
knowledge base. It never sees the levels a response was generated with, so it judges model outputs
the same way. Text it cannot parse costs coherence and scores lowest elsewhere; it never raises.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from steerlm.data.attributes import KNOWN_SCHEMAS
from steerlm.data.records import Role, Turn
from steerlm.data.synthetic.responses import MAX_LEVEL, quality_of
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
    compile_fact_patterns,
)

ATTRIBUTES = KNOWN_SCHEMAS["steerlm_oasst"]  # the world rates NeMo-Aligner's nine attributes
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ELABORATION = re.compile(", and (" + "|".join(map(re.escape, ELABORATIONS)) + ")$")
_SIMILE = re.compile(", like (" + "|".join(map(re.escape, SIMILES)) + ")$")


def _prompt_pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{e\}", r"(?P<e>[A-Z][a-z]+)").replace(r"\{f\}", r"(?P<f>[A-Z][a-z]+)")
    return re.compile(f"^{regex}$")


_QUESTION_PATTERNS = [(relation, _prompt_pattern(t)) for relation, t in QUESTIONS.items()]
_TARGET_PATTERNS = [_prompt_pattern(t) for t in (*DESCRIBE, *COMPARE, FOLLOW_UP_OTHER)]


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str
    tier: int
    garbled: bool
    elaborated: bool
    simile: bool


@dataclass(frozen=True)
class Request:
    targets: tuple[str, ...]
    asked: str | None


def parse_request(turns: Sequence[Turn]) -> Request:
    """What the last user turn asks for ("it" refers to the creature of the first user turn)."""
    users = [turn.text.strip() for turn in turns if turn.role == Role.user]
    if not users:
        return Request((), None)
    last = users[-1]
    if last == FOLLOW_UP_SAME:
        return (
            Request(parse_request([Turn(Role.user, users[0])]).targets[:1], None)
            if len(users) > 1
            else Request((), None)
        )
    for relation, pattern in _QUESTION_PATTERNS:
        match = pattern.match(last)
        if match:
            return Request((match["e"],), relation)
    for pattern in _TARGET_PATTERNS:
        match = pattern.match(last)
        if match:
            return Request(tuple(match[g] for g in ("e", "f") if g in pattern.groupindex), None)
    return Request((), None)


class Oracle:
    def __init__(self, world: World) -> None:
        self.world = world
        self._patterns = compile_fact_patterns()

    def _parse_fact(self, body: str, garbled: bool) -> Fact | None:
        simile = bool(_SIMILE.search(body))
        body = _SIMILE.sub("", body)
        elaborated = bool(_ELABORATION.search(body))
        body = _ELABORATION.sub("", body)
        for relation, tier, pattern in self._patterns:
            match = pattern.match(body)
            if match and match["e"] in self.world.facts and match["v"] in RELATIONS[relation]:
                return Fact(match["e"], relation, match["v"], tier, garbled, elaborated, simile)
        return None

    def parse_response(self, response: str) -> tuple[list[Fact], int, int, int]:
        """(facts, jokes, rude remarks, unparsed sentences)."""
        facts, jokes, rude, unparsed = [], 0, 0, 0
        for sentence in filter(None, (s.strip() for s in _SENTENCE_END.split(response.strip()))):
            if sentence in JOKES:
                jokes += 1
            elif sentence in RUDE:
                rude += 1
            else:
                body = sentence[:-1] if sentence.endswith(".") else sentence
                fact = self._parse_fact(body, garbled=False) or self._parse_fact(
                    " ".join(reversed(body.split(" "))), garbled=True
                )
                if fact is None:
                    unparsed += 1
                else:
                    facts.append(fact)
        return facts, jokes, rude, unparsed

    def score(self, prompt: Sequence[Turn] | str, response: str) -> dict[str, float]:
        """Scores 0-4 for the nine attributes of the steerlm_oasst schema (a superset of helpsteer2's)."""
        turns = [Turn(Role.user, prompt)] if isinstance(prompt, str) else list(prompt)
        request = parse_request(turns)
        facts, jokes, rude, unparsed = self.parse_response(response)
        on_target = [f for f in facts if f.entity in request.targets]
        helpfulness = min(MAX_LEVEL, len(on_target))
        if request.asked is not None and not any(f.relation == request.asked for f in on_target):
            helpfulness = min(helpfulness, 1)
        true = sum(self.world.facts[f.entity][f.relation] == f.value for f in facts)
        correctness = round(MAX_LEVEL * true / len(facts)) if facts else 0
        coherence = max(0, MAX_LEVEL - sum(f.garbled for f in facts) - unparsed) if facts else 0
        complexity = round(sum(f.tier for f in facts) / len(facts)) if facts else 0
        toxicity = min(MAX_LEVEL, rude)
        scores = {
            "helpfulness": helpfulness,
            "correctness": correctness,
            "coherence": coherence,
            "complexity": complexity,
            "verbosity": min(MAX_LEVEL, sum(f.elaborated for f in facts)),
            "humor": min(MAX_LEVEL, jokes),
            "toxicity": toxicity,
            "creativity": min(MAX_LEVEL, sum(f.simile for f in facts)),
        }
        # A reply without a single readable fact has no quality, however polite.
        scores["quality"] = quality_of(helpfulness, correctness, coherence, toxicity) if facts else 0
        return {name: float(scores[name]) for name in ATTRIBUTES}

    def annotate(
        self, prompt: Sequence[Turn] | str, response: str, rng: random.Random, noise_std: float, missing_rate: float
    ) -> dict[str, int | None]:
        """A simulated human rating: oracle score + Gaussian noise, rounded and clipped to 0-4; each
        value missing (None) with probability `missing_rate`."""
        labels: dict[str, int | None] = {}
        for name, value in self.score(prompt, response).items():
            noisy = int(round(min(max(value + rng.gauss(0.0, noise_std), 0.0), float(MAX_LEVEL))))
            labels[name] = None if rng.random() < missing_rate else noisy
        return labels
