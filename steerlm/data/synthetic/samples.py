"""Sample responses at the lowest and highest level of each attribute (for docs/synthetic_world.md)."""

from __future__ import annotations

import random
from dataclasses import replace

from steerlm.data.records import Role, Turn
from steerlm.data.synthetic.responses import SAMPLED, Levels, PromptSpec, generate_response
from steerlm.data.synthetic.world import QUESTIONS, World, build_world


def attribute_samples(seed: int = 0, num_entities: int = 60) -> str:
    """Markdown: one question, then per attribute its level-0 and level-4 answers (others at defaults)."""
    world: World = build_world(seed, num_entities)
    entity = world.entities[0]
    spec = PromptSpec((Turn(Role.user, QUESTIONS["food"].format(e=entity)),), (entity,), "food")
    lines = [f"Prompt: **{spec.turns[0].text}** (defaults: {Levels().as_dict()})", ""]
    for name in SAMPLED:
        lines.append(f"**{name}**")
        for level in (0, 4):
            text = generate_response(world, spec, replace(Levels(), **{name: level}), random.Random(f"doc:{name}"))
            lines.append(f"- {level}: {text}")
        lines.append("")
    return "\n".join(lines)
