"""Write the synthetic world's splits in the formats real data comes in.

    <output_dir>/
      annotated.jsonl        "human-annotated" rows, HelpSteer2 style: prompt (earlier turns packed with
                             <extra_id_1> markers), response, the nine attribute columns as noisy integer
                             ratings (-100 = not rated)
      unlabelled.jsonl       conversation JSONL without labels; `levels` holds the generator's intended
                             levels (ground truth for evaluation only — no stage reads it)
      eval_prompts.jsonl     held-out prompts as conversation JSONL ending with a user turn
      corpus.jsonl           the base LM's pretraining text ({"text": …}): encyclopedia paragraphs stating every
                             creature's facts, then the unlabelled conversations' text (synthetic/corpus.py)
      world.json             the knowledge base (the oracle's reference)
      tokenizer/word_vocab.json  a word-level tokenizer covering every split and template
      summary.json           sizes, per-attribute Spearman(intended, oracle), correlation matrix

Every row comes from its own generator seeded by (seed, split, index): the same seed gives
byte-identical files. Conversations use NeMo-Aligner's default system prompt, which the HelpSteer2
reader also gives the annotated rows, so every split renders alike.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np

from steerlm.data.attributes import MISSING, AttributeSchema
from steerlm.data.readers import DEFAULT_SYSTEM_PROMPT as SYSTEM_PROMPT
from steerlm.data.records import Conversation, Role, Turn, from_conversation_json, to_conversation_json
from steerlm.data.synthetic.corpus import conversation_text, encyclopedia
from steerlm.data.synthetic.oracle import ATTRIBUTES, Oracle
from steerlm.data.synthetic.responses import SAMPLED, Levels, PromptSpec, generate_response, sample_prompt
from steerlm.data.synthetic.sizes import SyntheticConfig
from steerlm.data.synthetic.world import World, build_world
from steerlm.data.template import SteerLMTemplate
from steerlm.files import atomic_write_text
from steerlm.tokenizers import WordTokenizer

SCHEMA = AttributeSchema("steerlm_oasst", ATTRIBUTES, 0, 4, True)
HS2_TURN = "\n<extra_id_1>{role}\n"


def _rng(sizes: SyntheticConfig, split: str, index: int) -> random.Random:
    return random.Random(f"{sizes.seed}:{split}:{index}")


def pack_helpsteer2_prompt(turns: tuple[Turn, ...]) -> str:
    """HelpSteer2's `prompt`: earlier turns joined with `\\n<extra_id_1>{Role}\\n` markers."""
    text = turns[0].text
    for turn in turns[1:]:
        text += HS2_TURN.format(role=turn.role.value) + turn.text
    return text


def _example(world: World, sizes: SyntheticConfig, split: str, index: int) -> tuple[PromptSpec, Levels, str]:
    rng = _rng(sizes, split, index)
    spec = sample_prompt(world, rng, sizes.multi_turn_fraction)
    levels = Levels.sample(rng)
    return spec, levels, generate_response(world, spec, levels, rng)


def _write_lines(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        ranked = np.empty(len(x))
        ranked[order] = np.arange(len(x))
        for value in np.unique(x):  # average ranks of ties
            ranked[x == value] = ranked[x == value].mean()
        return ranked

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def write_synthetic(sizes: SyntheticConfig, output_dir: str | Path) -> dict:
    """Generate every split into `output_dir`; returns (and writes) the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(sizes.seed, sizes.num_entities, sizes.knowledge_errors)
    oracle = Oracle(world)
    annotated, unlabelled, evaluation = [], [], []
    intended, judged = [], []
    for index in range(sizes.annotated_rows):
        spec, _, response = _example(world, sizes, "annotated", index)
        labels = oracle.annotate(
            spec.turns, response, _rng(sizes, "rating", index), sizes.label_noise, sizes.missing_label_rate
        )
        annotated.append(
            {
                "prompt": pack_helpsteer2_prompt(spec.turns),
                "response": response,
                **{name: MISSING if value is None else value for name, value in labels.items()},
            }
        )
    for index in range(sizes.unlabelled_rows):
        spec, levels, response = _example(world, sizes, "unlabelled", index)
        conversation = Conversation(
            SYSTEM_PROMPT, (*spec.turns, Turn(Role.assistant, response)), extra={"levels": levels.as_dict()}
        )
        unlabelled.append(to_conversation_json(conversation, SCHEMA))
        intended.append([levels.as_dict()[name] for name in ATTRIBUTES])
        judged.append([oracle.score(spec.turns, response)[name] for name in ATTRIBUTES])
    for index in range(sizes.eval_prompts):
        spec = sample_prompt(world, _rng(sizes, "eval", index), sizes.multi_turn_fraction)
        evaluation.append(to_conversation_json(Conversation(SYSTEM_PROMPT, spec.turns), SCHEMA))
    _write_lines(out / "annotated.jsonl", annotated)
    _write_lines(out / "unlabelled.jsonl", unlabelled)
    _write_lines(out / "eval_prompts.jsonl", evaluation)
    corpus = encyclopedia(world, sizes.encyclopedia_paragraphs, sizes.seed)
    for index, row in enumerate(unlabelled[: sizes.corpus_conversations]):
        corpus.append(conversation_text(from_conversation_json(row, SCHEMA, "unlabelled.jsonl", index + 1)))
    _write_lines(out / "corpus.jsonl", [{"text": text} for text in corpus])
    (out / "world.json").write_text(json.dumps(asdict(world), indent=1) + "\n")
    tokenizer = build_tokenizer(annotated, unlabelled, evaluation, corpus)
    tokenizer.save(out / "tokenizer")
    summary = _summary(sizes, np.array(intended), np.array(judged), tokenizer.vocab_size)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_tokenizer(
    annotated: list[dict], unlabelled: list[dict], evaluation: list[dict], corpus: list[str]
) -> WordTokenizer:
    """Word vocabulary of every text the stages will render, including every attribute string."""
    template = SteerLMTemplate(SCHEMA)
    texts = [row["prompt"] + "\n" + row["response"] for row in annotated] + corpus
    for row in unlabelled + evaluation:
        texts.extend([row["system"], *(turn["value"] for turn in row["conversations"])])
    every_label = {name: level for level in range(5) for name in ATTRIBUTES}
    texts.append(
        template.render(Conversation(SYSTEM_PROMPT, (Turn(Role.user, "x"), Turn(Role.assistant, "y"))))
        + " ".join(f"{name}:{level}," for name in every_label for level in range(5))
    )
    return WordTokenizer.build(texts)


def _summary(sizes: SyntheticConfig, intended: np.ndarray, judged: np.ndarray, vocab_size: int) -> dict:
    spearman = {name: _spearman(intended[:, i], judged[:, i]) for i, name in enumerate(ATTRIBUTES)}
    sampled = [ATTRIBUTES.index(name) for name in SAMPLED]
    correlation = np.corrcoef(judged[:, sampled].T)
    return {
        "sizes": asdict(sizes),
        "tokenizer_vocab_size": vocab_size,
        "spearman_intended_vs_oracle": spearman,
        "oracle_correlation": {
            a: {b: round(float(correlation[i, j]), 4) for j, b in enumerate(SAMPLED)} for i, a in enumerate(SAMPLED)
        },
        "max_abs_correlation_between_independent_attributes": float(np.abs(correlation - np.eye(len(SAMPLED))).max()),
    }


def format_synthetic_summary(summary: dict) -> str:
    sizes = summary["sizes"]
    lines = [
        f"synthetic world seed {sizes['seed']}: {sizes['num_entities']} creatures, "
        f"{sizes['annotated_rows']} annotated rows, {sizes['unlabelled_rows']} unlabelled, "
        f"{sizes['eval_prompts']} eval prompts, {sizes['knowledge_errors']} knowledge errors, "
        f"word vocabulary {summary['tokenizer_vocab_size']}",
        "Spearman(intended level, oracle): "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["spearman_intended_vs_oracle"].items()),
        "oracle score correlation between independently sampled attributes:",
    ]
    names = list(summary["oracle_correlation"])
    lines.append(" " * 12 + "".join(f"{n[:10]:>11}" for n in names))
    for a in names:
        lines.append(f"{a[:11]:>12}" + "".join(f"{summary['oracle_correlation'][a][b]:>11.3f}" for b in names))
    lines.append(
        f"max |r| between independent attributes: {summary['max_abs_correlation_between_independent_attributes']:.3f}"
    )
    return "\n".join(lines)
