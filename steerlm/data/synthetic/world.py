"""The synthetic world: invented creatures with five typed facts each, and the phrases that talk about them.

Everything here is data shared by the response generator and the oracle: the knowledge base (built
from a seed), the fact-sentence templates at five complexity tiers, and the fixed phrase pools
(elaborations, similes, jokes, rude remarks, prompts). Entity names and fact values are single
lower/upper-case words so sentences parse unambiguously.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property

RELATIONS: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "food": ("apples", "fish", "seeds", "honey", "leaves", "bread", "berries", "rice"),
    "home": ("forest", "desert", "river", "mountain", "island", "valley", "cave", "meadow"),
    "size": ("tiny", "small", "medium", "large", "huge", "giant", "slim", "stout"),
    "sound": ("hum", "song", "whistle", "roar", "click", "buzz", "chirp", "growl"),
}

# FACT_TEMPLATES[relation][tier]: tier 0 is the plainest wording, tier 4 the most elaborate.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "{e} is {v}",
        "{e} has a {v} coat",
        "The coat of {e} is mostly {v}",
        "{e} displays a distinctly {v} coloration",
        "{e} exhibits a predominantly {v} pigmentation across its integument",
    ),
    "food": (
        "{e} eats {v}",
        "{e} likes to eat {v}",
        "The main food of {e} is {v}",
        "{e} subsists largely on {v}",
        "{e} derives its principal nourishment from {v}",
    ),
    "home": (
        "{e} lives in the {v}",
        "{e} makes its home in the {v}",
        "The usual home of {e} is the {v}",
        "{e} dwells predominantly within the {v}",
        "{e} inhabits the {v} as its characteristic habitat",
    ),
    "size": (
        "{e} is {v} in size",
        "{e} has a {v} body",
        "The body of {e} is rather {v}",
        "{e} possesses a notably {v} physique",
        "{e} manifests a conspicuously {v} morphology",
    ),
    "sound": (
        "{e} makes a {v}",
        "{e} likes to make a {v}",
        "The usual call of {e} is a {v}",
        "{e} frequently emits a distinctive {v}",
        "{e} characteristically produces a resonant {v} vocalization",
    ),
}
TIERS = 5

ELABORATIONS = (
    "this is well known",
    "many travellers have noticed this",
    "it has always been so",
    "the elders often mention it",
    "this is easy to observe",
    "it stays that way all year",
    "young ones share this trait",
    "it is part of its nature",
)
SIMILES = (
    "a lantern in the night",
    "a song at dawn",
    "a river of stars",
    "a dream of summer",
    "a whisper of wind",
    "a painted cloud",
    "a drum in the hills",
    "a spark of fire",
)
JOKES = (
    "Imagine it wearing a tiny hat!",
    "It would win any dance contest!",
    "Ha, even its shadow tells jokes!",
    "Its neighbours call it the class clown!",
    "It once tried to juggle pebbles!",
    "Picture it riding a bicycle!",
    "It probably snores in rhythm!",
    "Nobody laughs louder at its own jokes!",
)
RUDE = (
    "Honestly, that was a silly question.",
    "Try to keep up.",
    "Do I have to explain everything?",
    "Pay attention this time.",
    "Even a child knows this.",
    "What a boring thing to ask.",
    "Stop wasting my time.",
    "Listen carefully, fool.",
)

QUESTIONS: dict[str, str] = {
    "color": "What color is {e}?",
    "food": "What does {e} eat?",
    "home": "Where does {e} live?",
    "size": "How big is {e}?",
    "sound": "What sound does {e} make?",
}
DESCRIBE = ("Tell me about {e}.", "Describe {e}.", "What do you know about {e}?", "List some facts about {e}.")
COMPARE = ("Compare {e} and {f}.", "How do {e} and {f} differ?")
FOLLOW_UP_SAME = "Tell me more about it."
FOLLOW_UP_OTHER = "What about {e}?"

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ve",
    "zu",
    "to",
    "ni",
    "pa",
    "sho",
    "dri",
    "bel",
    "mor",
    "tan",
    "fi",
    "gu",
    "lin",
    "qua",
    "rex",
    "sel",
    "vor",
    "wim",
    "yal",
    "zen",
)


KNOWLEDGE_ERRORS = ("random", "fixed")


@dataclass(frozen=True)
class World:
    """Entities (names) and their facts: facts[name][relation] = value.

    `knowledge_errors` says how a response gets a fact wrong or goes off topic: `random` (any other value of the
    relation, any other creature) or `fixed` (the next value in the relation's list, the asked creature's
    neighbour in a fixed ring, `neighbours`). Random errors have no single most likely form, so greedy decoding
    always states the true value about the asked creature; fixed ones make every slot a choice between two tokens,
    as for the surface attributes (docs/pipeline_measurements.md measures both)."""

    seed: int
    facts: dict[str, dict[str, str]]
    knowledge_errors: str = "random"
    neighbours: dict[str, str] = field(default_factory=dict)

    @property
    def entities(self) -> list[str]:
        return list(self.facts)

    @cached_property
    def entity_pattern(self) -> re.Pattern:
        return re.compile(r"\b(" + "|".join(sorted(self.facts, key=len, reverse=True)) + r")\b")


def build_world(seed: int, num_entities: int, knowledge_errors: str = "random") -> World:
    """`num_entities` creatures with unique invented names and one value per relation, from `seed`; with fixed
    knowledge errors also each creature's neighbour (a ring through every creature, from its own generator, so
    the facts are the same either way)."""
    rng = random.Random(f"world:{seed}")
    names: list[str] = []
    while len(names) < num_entities:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in names:
            names.append(name)
    facts = {name: {relation: rng.choice(values) for relation, values in RELATIONS.items()} for name in names}
    neighbours = {}
    if knowledge_errors == "fixed":
        ring = random.Random(f"neighbours:{seed}").sample(names, len(names))
        neighbours = {name: ring[(i + 1) % len(ring)] for i, name in enumerate(ring)}
    return World(seed=seed, facts=facts, knowledge_errors=knowledge_errors, neighbours=neighbours)


def fact_sentence_base(relation: str, tier: int, entity: str, value: str) -> str:
    return FACT_TEMPLATES[relation][tier].format(e=entity, v=value)


def compile_fact_patterns() -> list[tuple[str, int, re.Pattern]]:
    """(relation, tier, regex) for every template; groups `e` (entity) and `v` (value)."""
    patterns = []
    for relation, templates in FACT_TEMPLATES.items():
        for tier, template in enumerate(templates):
            regex = re.escape(template).replace(r"\{e\}", r"(?P<e>[A-Z][a-z]+)").replace(r"\{v\}", r"(?P<v>[a-z]+)")
            patterns.append((relation, tier, re.compile(f"^{regex}$")))
    return patterns
