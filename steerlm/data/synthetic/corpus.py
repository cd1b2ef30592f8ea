"""The synthetic world's pretraining corpus: what a base LM reads before any SteerLM stage.

A real SteerLM run starts from a pretrained LM that already knows the world; here the base LM learns it from
two kinds of plain text, written as `{"text": …}` JSONL (`corpus.jsonl`):

- encyclopedia paragraphs: every creature's five facts, always true, in every wording tier and in shuffled
  orders (`encyclopedia_paragraphs` per creature), so the facts are stated often and in every form a response
  may later use; with fixed knowledge errors also the creature's neighbour (`Zuvezen lives next to Pafipa.`),
  which an off-target answer talks about;
- the unlabelled conversations' text (prompt turns then response), the "web" part: the style of answers,
  including their jokes, similes and — at low correctness — wrong statements, as real web text has them.
"""

from __future__ import annotations

import random

from steerlm.data.records import Conversation
from steerlm.data.synthetic.world import RELATIONS, TIERS, World, fact_sentence_base


def encyclopedia_paragraph(world: World, entity: str, rng: random.Random) -> str:
    """The creature's five true facts, each in a random wording tier, in a random order (and its neighbour, at a
    random place, where the world has neighbours)."""
    relations = list(RELATIONS)
    rng.shuffle(relations)
    facts = world.facts[entity]
    sentences = [fact_sentence_base(r, rng.randrange(TIERS), entity, facts[r]) + "." for r in relations]
    if world.neighbours:
        sentences.insert(rng.randrange(len(sentences) + 1), f"{entity} lives next to {world.neighbours[entity]}.")
    return " ".join(sentences)


def encyclopedia(world: World, paragraphs_per_entity: int, seed: int) -> list[str]:
    """`paragraphs_per_entity` paragraphs per creature, interleaved creature by creature."""
    rng = random.Random(f"encyclopedia:{seed}")
    return [
        encyclopedia_paragraph(world, entity, rng) for _ in range(paragraphs_per_entity) for entity in world.entities
    ]


def conversation_text(conversation: Conversation) -> str:
    """A conversation as plain text: its turns, one per line (no template markers: a base LM has never seen
    them)."""
    return "\n".join(turn.text for turn in conversation.turns)
