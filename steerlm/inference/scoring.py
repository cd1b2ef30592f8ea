"""Score responses with a trained Attribute Prediction Model: the public, batched scoring API.

    scorer = AttributeScorer.from_checkpoint("runs/apm", layout)    # after runtime.initialize(...)
    scorer.score(conversations)  # → [{"quality": 3.2, …, "verbosity": 1.1(, "reward": 2.4)}, …]

The checkpoint's saved config supplies the tokenizer, the attribute schema and the model shape; the model
is built at the caller's layout (any TP/PP/DP; checkpoints are layout-independent). Scoring is collective:
every rank calls it in lockstep with the same conversations and gets the same numbers.

Inputs go through `attribute_examples` — the tokenisation APM training, evaluation and annotation use —
and `score_examples`, so the scorer, `recipes/annotate.py` and `recipes/evaluate_attribute_model.py`
compute exactly the same numbers for the same inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch

from steerlm.checkpoint.sharded import load_weights, resolve_checkpoint, saved_config, unwrap
from steerlm.config import AttributeModelConfig, ConfigError, to_typed
from steerlm.config.schema import APMType, validate_merge_weights
from steerlm.data.apm import (
    AttributeExample,
    TurnSelector,
    attribute_batch,
    attribute_examples,
    attribute_string_budget,
    last_assistant_turn,
    parse_attribute_string,
)
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import length_buckets
from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.data.readers import unschema_ratings
from steerlm.data.records import Conversation, Role
from steerlm.data.template import SteerLMTemplate, TemplateConfig, Tokenization
from steerlm.errors import DataError
from steerlm.evaluation.apm_metrics import REWARD, attribute_metrics, merged_reward, reward_metrics
from steerlm.inference.generate import Generator, SamplingParams
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.gpt import build_model_chunks
from steerlm.runtime.layout import ParallelLayout
from steerlm.tokenizers import Tokenizer, load_tokenizer
from steerlm.training import ATTRIBUTE_REGRESSION, predict

log = logging.getLogger(__name__)


class HasIds(Protocol):
    """Anything scored by length: an APM's input, an LM's example, the Bayes judge's variants of one turn."""

    @property
    def ids(self) -> Sequence[int]: ...


E = TypeVar("E", bound=HasIds)


@dataclass(frozen=True)
class APMCheckpoint:
    """An APM checkpoint directory and the resolved config it was trained with (no weights loaded)."""

    path: Path
    config: AttributeModelConfig

    @property
    def schema(self) -> AttributeSchema:
        return self.config.attributes.schema()


def open_apm_checkpoint(location: str | Path, key: str = "apm_checkpoint") -> APMCheckpoint:
    """A run directory (its `checkpoints/latest`) or checkpoint of `recipes/train_attribute_model.py`.

    Anything else is a ConfigError naming `key`, e.g. a language-model checkpoint, which has no head.
    """
    fix = f"pass {key}=<output_dir of recipes/train_attribute_model.py, or one of its checkpoints/step_* directories>"
    try:
        path = resolve_checkpoint(location)
    except FileNotFoundError as error:
        raise ConfigError(key, str(location), str(error).split("; ")[0], fix) from None
    saved = saved_config(path)
    if "apm" not in saved:
        raise ConfigError(key, str(location), f"{path} is not an attribute model (its config has no apm section)", fix)
    return APMCheckpoint(path, to_typed(saved, AttributeModelConfig))


def check_rated_attributes(conversation: Conversation, schema: AttributeSchema, key: str, location: str) -> None:
    """HelpSteer-style rows keep unknown columns as passthrough: a column rating an attribute the APM's schema
    lacks means data and APM disagree (its ratings would be ignored), so it is refused, naming `key`."""
    unknown = unschema_ratings(conversation, schema)
    if unknown:
        raise ConfigError(
            key,
            location,
            f"{conversation.source} rates {', '.join(unknown)}, which the APM's schema "
            f"'{schema.name}' ({', '.join(schema.attributes)}) lacks",
            "use an APM trained for those attributes, or remove those columns from the data",
        )


def by_length_buckets(
    examples: Sequence[E],
    micro_batch_size: int,
    layout: ParallelLayout,
    score_batch: Callable[[list[E]], list[list[float]]],
) -> np.ndarray:
    """`[len(examples), ...]` rows of `score_batch`, identical on every rank (collective).

    Examples are bucketed by length into batches whose composition depends only on `examples`, and
    batch b is scored by data-parallel rank b mod dp, so any DP size computes exactly the same numbers.
    """
    local: dict[int, list[float]] = {}
    for number, members in enumerate(length_buckets([len(e.ids) for e in examples], micro_batch_size)):
        if number % layout.dp == layout.dp_rank:
            local.update(zip(members, score_batch([examples[i] for i in members])))
    gathered: list[dict] = [{} for _ in range(layout.world_size)]
    torch.distributed.all_gather_object(gathered, local)
    merged = {index: row for part in gathered for index, row in part.items()}
    return np.array([merged[i] for i in range(len(examples))], dtype=np.float64)


@torch.no_grad()
def score_examples(
    model: list, examples: Sequence[AttributeExample], micro_batch_size: int, pad_id: int, layout: ParallelLayout
) -> np.ndarray:
    """`[len(examples), attributes]` raw scores of a regression APM, identical on every rank (collective).

    The model is put in eval mode for the call and left as it was.
    """
    modes = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()

    def score_batch(batch: list[AttributeExample]) -> list[list[float]]:
        scores = predict(model, [attribute_batch(batch, pad_id)], layout, ATTRIBUTE_REGRESSION)[0]
        return scores.cpu().tolist()

    try:
        return by_length_buckets(examples, micro_batch_size, layout, score_batch)
    finally:
        for chunk, training in zip(model, modes):
            chunk.train(training)


class AttributeScorer:
    """An APM (model chunks of this rank) with its schema and tokenizer, scoring conversations in batches.

    `seq_length` bounds an input; longer inputs keep their end (the rated response and the position the
    scores are read at) under `LengthPolicy.truncate` — annotation's policy and the default — or are dropped
    under `LengthPolicy.drop` (training's; `score` then refuses them). With `merge_weights` (one per
    attribute, schema order; NeMo-Aligner's merge_attributes) the scorer also gives a reward: the weighted
    sum of the raw scores. `tokenization` is the APM's `template.tokenization` (the ids it was trained on).
    """

    def __init__(
        self,
        model: list,
        layout: ParallelLayout,
        schema: AttributeSchema,
        tokenizer: Tokenizer,
        *,
        seq_length: int,
        micro_batch_size: int = 16,
        length_policy: LengthPolicy = LengthPolicy.truncate,
        merge_weights: Sequence[float] | None = None,
        tokenization: Tokenization = Tokenization.markers,
    ) -> None:
        validate_merge_weights("merge_weights", None if merge_weights is None else list(merge_weights), schema)
        if merge_weights is not None and REWARD in schema.attributes:
            raise ConfigError(
                "merge_weights",
                list(merge_weights),
                f"schema '{schema.name}' has an attribute named {REWARD!r}, which the merged score's key would hide",
                "rename that attribute, or merge_weights=null",
            )
        self.model, self.layout, self.schema, self.tokenizer = model, layout, schema, tokenizer
        self.template = SteerLMTemplate(schema, TemplateConfig(tokenization=tokenization))
        self.seq_length, self.micro_batch_size, self.length_policy = seq_length, micro_batch_size, length_policy
        self.merge_weights = None if merge_weights is None else tuple(float(w) for w in merge_weights)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: APMCheckpoint | str | Path,
        layout: ParallelLayout,
        *,
        micro_batch_size: int = 16,
        seq_length: int | None = None,
        length_policy: LengthPolicy = LengthPolicy.truncate,
        merge_weights: Sequence[float] | None = None,
        seed: int = 1234,
        verify: bool = True,
    ) -> AttributeScorer:
        """Build and load the APM a checkpoint describes at `layout` (collective).

        `seq_length` defaults to the APM's `model.max_position_embeddings`; `merge_weights` to its reward weights
        (`apm.merge_weights`, or uniform with `apm.merge_attributes`; neither: no reward). `verify`: check the
        checkpoint's checksums first (`verify_checkpoint`).
        """
        apm = checkpoint if isinstance(checkpoint, APMCheckpoint) else open_apm_checkpoint(checkpoint)
        cfg, schema = apm.config, apm.schema
        tokenization = cfg.template.tokenization
        tokenizer = load_tokenizer(cfg.tokenizer.type.value, cfg.tokenizer.path, tokenization.markers_are_tokens)
        generative = cfg.apm.type == APMType.generative
        chunks = (
            build_model_chunks(cfg.model, cfg.precision, layout, seed)
            if generative
            else build_attribute_model_chunks(cfg.model, cfg.precision, layout, seed, len(schema.attributes))
        )
        load_weights(apm.path, chunks, layout, cfg.model, verify=verify)
        for chunk in chunks:
            chunk.eval()
        kind: type[AttributeScorer] = GenerativeAttributeScorer if generative else cls
        return kind(
            chunks,
            layout,
            schema,
            tokenizer,
            seq_length=seq_length or cfg.model.max_position_embeddings,
            micro_batch_size=micro_batch_size,
            length_policy=length_policy,
            merge_weights=merge_weights if merge_weights is not None else cfg.apm.reward_weights(schema),
            tokenization=tokenization,
        )

    def examples(
        self,
        conversations: Sequence[Conversation],
        select: TurnSelector = last_assistant_turn,
        stats: LengthStats | None = None,
    ) -> list[AttributeExample]:
        """The APM inputs of the turns `select` picks (default: each conversation's last assistant turn)."""
        return attribute_examples(
            conversations,
            self.schema,
            self.template,
            self.tokenizer,
            self.seq_length,
            self.length_policy,
            stats if stats is not None else LengthStats(),
            select,
        )

    def score_examples(self, examples: Sequence[AttributeExample]) -> np.ndarray:
        """`[len(examples), attributes]` raw scores in schema order (collective)."""
        scores = score_examples(self.model, examples, self.micro_batch_size, self.tokenizer.pad_id, self.layout)
        return scores.reshape(len(examples), len(self.schema.attributes))

    def rewards(self, scores: np.ndarray) -> np.ndarray | None:
        """`[rows]` merged scores (weights · raw scores), or None without merge weights."""
        return None if self.merge_weights is None else merged_reward(scores, self.merge_weights)

    def score(self, conversations: Sequence[Conversation]) -> list[dict[str, float]]:
        """Raw scores of each conversation's last assistant turn (schema order), plus `reward` when merging.

        Collective. A conversation without an assistant turn, or (under `LengthPolicy.drop`) longer than
        `seq_length`, is a DataError naming its source.
        """
        conversations = list(conversations)
        for conversation in conversations:
            if not any(turn.role == Role.assistant for turn in conversation.turns):
                raise DataError(
                    conversation.source or "<conversation>",
                    None,
                    "conversations",
                    "has no assistant turn to score",
                    "end the conversation with the response to rate",
                )
        examples = self.examples(conversations)
        if len(examples) != len(conversations):
            kept = {example.turn[0] for example in examples}
            first = next(c for i, c in enumerate(conversations) if i not in kept)
            raise DataError(
                first.source or "<conversation>",
                None,
                "conversations",
                f"is longer than seq_length={self.seq_length} tokens",
                "raise seq_length, or score with length_policy=truncate (keeps the end)",
            )
        scores = self.score_examples(examples)
        rewards = self.rewards(scores)
        rows = [dict(zip(self.schema.attributes, map(float, row))) for row in scores]
        if rewards is not None:
            for row, reward in zip(rows, rewards):
                row[REWARD] = float(reward)
        return rows

    def metrics(self, examples: Sequence[AttributeExample]) -> dict:
        """Per-attribute metrics of the scores against the examples' targets (and the reward's, when merging)."""
        scores = self.score_examples(examples)
        targets = np.array([example.targets for example in examples], dtype=np.float64).reshape(scores.shape)
        metrics = attribute_metrics(scores, targets, self.schema)
        if self.merge_weights is not None:
            metrics[REWARD] = reward_metrics(scores, targets, self.merge_weights)
        return metrics


class GenerativeAttributeScorer(AttributeScorer):
    """A generative APM — a language model trained to write the attribute string after the label prefix
    (`…{response}\\n<extra_id_2>quality:4,…,verbosity:2\\n`), the SteerLM paper's original APM.

    Scores are parsed from its greedy continuation (`parse_attribute_string`); an attribute it did not write
    well is NaN (missing), and `last_generation` reports how many strings were complete or malformed, with
    examples. Prompts are capped at `seq_length - attribute_string_budget` tokens so the string fits.
    Generates with one model chunk per pipeline stage (no interleaved stages).
    """

    def __init__(
        self,
        model: list,
        layout: ParallelLayout,
        schema: AttributeSchema,
        tokenizer: Tokenizer,
        *,
        seq_length: int,
        micro_batch_size: int = 16,
        length_policy: LengthPolicy = LengthPolicy.truncate,
        merge_weights: Sequence[float] | None = None,
        tokenization: Tokenization = Tokenization.markers,
    ) -> None:
        template = SteerLMTemplate(schema, TemplateConfig(tokenization=tokenization))
        self.suffix = template.config.turn_suffix
        self.budget = attribute_string_budget(schema, tokenizer, template)
        super().__init__(
            model,
            layout,
            schema,
            tokenizer,
            seq_length=seq_length - self.budget,
            micro_batch_size=micro_batch_size,
            length_policy=length_policy,
            merge_weights=merge_weights,
            tokenization=tokenization,
        )
        stops = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        self.generator = Generator([unwrap(model[0])], tokenizer, layout, seq_length + 1, stops)
        self.last_generation: dict = {}

    def score_examples(self, examples: Sequence[AttributeExample]) -> np.ndarray:
        params = SamplingParams(max_new_tokens=self.budget + 1, stop=(self.suffix,))
        logged: list[str] = []

        def score_batch(batch: list[AttributeExample]) -> list[list[float]]:
            completions = self.generator.generate([list(e.ids) for e in batch], [params] * len(batch))
            rows = []
            for example, completion in zip(batch, completions):
                values, problems = parse_attribute_string(self.schema, completion.text)
                if (problems or len(values) < len(self.schema.attributes)) and len(logged) < 3:
                    logged.append(example.source)
                    log.warning(
                        "%s: the generative APM wrote %r (unreadable: %s)",
                        example.source or "<example>",
                        completion.text,
                        ", ".join(problems) or "none; attributes missing",
                    )
                rows.append([values.get(name, math.nan) for name in self.schema.attributes])
            return rows

        scores = by_length_buckets(examples, self.micro_batch_size, self.layout, score_batch)
        scores = scores.reshape(len(examples), len(self.schema.attributes))
        self.last_generation = self._report(examples, scores)
        return scores

    def _report(self, examples: Sequence[AttributeExample], scores: np.ndarray) -> dict:
        complete = int((~np.isnan(scores)).all(axis=1).sum())
        missing = np.isnan(scores).sum(axis=0)
        return {
            "rows": len(examples),
            "complete": complete,
            "incomplete": len(examples) - complete,
            "unwritten": {name: int(n) for name, n in zip(self.schema.attributes, missing) if n},
        }

    def metrics(self, examples: Sequence[AttributeExample]) -> dict:
        metrics = super().metrics(examples)
        metrics["generation"] = self.last_generation
        return metrics
