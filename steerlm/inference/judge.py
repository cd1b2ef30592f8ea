"""Judge attributes by Bayes' rule with an attribute-conditioned SteerLM model: the Bayes judge.

A regression APM reads an attribute off the response text. That works for what the text shows (toxicity, humor,
verbosity) and fails for what it can only know from the world (is the stated fact right?): trained on a few
thousand ratings, the APM's correctness is no better than chance (docs/pipeline_measurements.md). An
attribute-conditioned LM trained on the same kind of rated data models the other direction, P(y | x, a): which text
goes with which attribute values. Knowledge it has learned then shows up as likelihood: a wrong fact is likely
under `correctness:0` and unlikely under `correctness:4`. Bayes' rule inverts it, one judged attribute j at a time,
the other attributes held at the values given (the APM's, or a human's):

    P(a_j = v | x, y, a_-j)  ∝  P(y | x, a_-j, a_j = v) · P(a_j = v)

With the uniform prior used here the posterior is the softmax over the schema's levels v of the response's
log-probability under the attribute line with a_j = v; the judged score is the posterior mean. Each judged turn
is scored once per level and judged attribute. The variants share everything up to the first judged value, so
that prefix runs once per turn and the variants continue from its cached keys and values
(steerlm/inference/prefix_scoring.py; each variant whole through megatron's forward where the lean decoder cannot
run the model). Turns are scored in length buckets split over data-parallel ranks (`by_length_buckets`), so every
data-parallel size computes the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from steerlm import runtime
from steerlm.checkpoint.integrity import checkpoint_identity
from steerlm.config import ConfigError
from steerlm.config.annotate import JudgeConfig
from steerlm.config.schema import PrecisionConfig
from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.collate import Example, pad_batch
from steerlm.data.label_fit import LinearFit, fit_linear
from steerlm.data.lengths import LengthStats
from steerlm.data.readers import read_records
from steerlm.data.records import Conversation, Turn
from steerlm.data.steerlm2 import response_example
from steerlm.inference.decoders import LeanDecoder, lean_unsupported
from steerlm.inference.loading import LoadedModel, load_generator
from steerlm.inference.prefix_scoring import grouped_log_probs
from steerlm.inference.scoring import by_length_buckets
from steerlm.runtime.layout import ParallelLayout
from steerlm.training import SEQUENCE_LOG_PROB, predict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgedTurn:
    """One assistant response to judge: its conversation before it, and the values of every attribute."""

    system: str
    context: tuple[Turn, ...]  # the turns before the response (ending with a user turn)
    response: str
    labels: Mapping[str, float | None]  # the judged attributes' values are replaced by each level in turn
    source: str = ""


@dataclass(frozen=True)
class _Variants:
    """One turn's sequences, one per judged attribute and level, bucketed by length as a unit."""

    examples: list[Example]

    @property
    def ids(self) -> tuple[int, ...]:  # by_length_buckets' length: the longest variant's
        return max((e.ids for e in self.examples), key=len)


class BayesJudge:
    """A stage-3 style (attribute-conditioned) model of this rank, judging `attributes` of responses."""

    def __init__(
        self,
        loaded: LoadedModel,
        attributes: Sequence[str],
        layout: ParallelLayout,
        micro_batch_size: int,
        shared_prefix: bool = True,
    ) -> None:
        self.loaded, self.layout, self.micro_batch_size = loaded, layout, micro_batch_size
        self.attributes = tuple(attributes)
        schema = loaded.schema
        self.levels = tuple(float(v) for v in range(int(schema.min_value), int(schema.max_value) + 1))
        self.max_positions = loaded.model.max_position_embeddings
        # A turn's variants share their context and the attribute line up to the first judged value: computed once
        # where the lean decoder runs the model (steerlm/inference/prefix_scoring.py), else each variant whole.
        model = loaded.generator.model
        lean = shared_prefix and lean_unsupported(model) is None
        self.decoder = LeanDecoder(model, layout, self.max_positions + 1) if lean else None
        self.scoring = "shared_prefix" if lean else "whole"

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        layout: ParallelLayout,
        attributes: Sequence[str],
        schema: AttributeSchema,
        *,
        micro_batch_size: int = 64,
        precision: PrecisionConfig | None = None,
        verify: bool = True,
        key: str = "judge.checkpoint",
    ) -> BayesJudge:
        """Load a `recipes/train_sft.py` checkpoint as the judge of `attributes` of data labelled in `schema`
        (collective). ConfigError naming `key` when it cannot judge them: no attribute line, another schema, or
        a non-integer scale (no levels to sum over)."""
        loaded = load_generator(checkpoint, layout, precision or PrecisionConfig(), seed=0, key=key, verify=verify)
        check_judge(loaded, attributes, schema, checkpoint, key)
        return cls(loaded, attributes, layout, micro_batch_size)

    def examples(self, turn: JudgedTurn, lengths: LengthStats | None = None) -> list[Example]:
        """The response under each judged attribute's every level (attribute-major); an example longer than the
        model's positions keeps its end (the attribute line and response) and is counted in `lengths`."""
        loaded, out = self.loaded, []
        for name in self.attributes:
            for level in self.levels:
                labels = {**turn.labels, name: level}
                example = response_example(
                    loaded.template, loaded.tokenizer, turn.system, turn.context, labels, turn.response, turn.source
                )
                out.append(self._fit(example, lengths))
        return out

    def _fit(self, example: Example, lengths: LengthStats | None) -> Example:
        keep = self.max_positions + 1
        if len(example.ids) <= keep:
            return example
        if lengths is not None:
            lengths.truncated += 1
        return Example(example.ids[-keep:], example.trainable[-keep:], example.source)

    def posteriors(self, turns: Sequence[JudgedTurn], lengths: LengthStats | None = None) -> np.ndarray:
        """`[turns, attributes, levels]` posterior probabilities under a uniform prior (collective)."""
        if not turns:
            return np.zeros((0, len(self.attributes), len(self.levels)))
        variants = len(self.attributes) * len(self.levels)
        model, pad_id = self.loaded.generator.model, self.loaded.tokenizer.pad_id
        if self.decoder is not None:
            decoder = self.decoder
            groups = [_Variants(turn_examples) for turn in turns for turn_examples in [self.examples(turn, lengths)]]

            def score_groups(batch: list[_Variants]) -> list[list[float]]:
                with runtime.inference():
                    return grouped_log_probs(decoder, [group.examples for group in batch])

            # buckets of whole turns, about micro_batch_size sequences each
            log_p = by_length_buckets(groups, max(1, self.micro_batch_size // variants), self.layout, score_groups)
        else:
            examples = [example for turn in turns for example in self.examples(turn, lengths)]

            def score_batch(batch: list[Example]) -> list[list[float]]:
                values = predict([model], [pad_batch(batch, pad_id)], self.layout, SEQUENCE_LOG_PROB)[0]
                return [[value] for value in values.double().cpu().tolist()]

            log_p = by_length_buckets(examples, self.micro_batch_size, self.layout, score_batch)
        log_p = log_p.reshape(len(turns), len(self.attributes), len(self.levels))
        shifted = np.exp(log_p - log_p.max(axis=2, keepdims=True))
        return shifted / shifted.sum(axis=2, keepdims=True)

    def scores(self, turns: Sequence[JudgedTurn], lengths: LengthStats | None = None) -> np.ndarray:
        """`[turns, attributes]` posterior means (collective)."""
        return self.posteriors(turns, lengths) @ np.array(self.levels)


def check_judge(
    loaded: LoadedModel, attributes: Sequence[str], schema: AttributeSchema, checkpoint: str, key: str
) -> None:
    """ConfigError naming `key` unless `loaded` conditions on `schema`'s attribute line and can judge `attributes`."""
    fix = "pass a recipes/train_sft.py checkpoint trained with attributes on data of the same schema"
    if not loaded.template.config.condition_on_attributes:
        raise ConfigError(key, checkpoint, "was trained without an attribute line (a plain-SFT model)", fix)
    if loaded.schema.attributes != schema.attributes:
        raise ConfigError(
            key,
            checkpoint,
            f"its schema '{loaded.schema.name}' ({', '.join(loaded.schema.attributes)}) is not the data's "
            f"'{schema.name}' ({', '.join(schema.attributes)})",
            fix,
        )
    if not loaded.schema.integer:
        raise ConfigError(key, checkpoint, f"schema '{loaded.schema.name}' is not on an integer scale", fix)
    require_attributes(attributes, schema, key.rsplit(".", 1)[0] + ".attributes", allow_empty=False)


def require_attributes(names: Sequence[str], schema: AttributeSchema, key: str, allow_empty: bool = True) -> None:
    """ConfigError naming `key` unless every name is an attribute of `schema` (and, unless allowed, one is given)."""
    unknown = [name for name in names if name not in schema.attributes]
    if unknown or not (names or allow_empty):
        raise ConfigError(
            key,
            list(names),
            f"{unknown[0]!r} is not an attribute of schema '{schema.name}'" if unknown else "is empty",
            f"name some of {', '.join(schema.attributes)}",
        )


# A scored turn's labels from its raw scores (rounded as written): the caller's rule (annotate's mode, or plain
# clipping and rounding)
LabelRule = Callable[[Turn, list], Labels]


@dataclass(frozen=True)
class Judging:
    """A `JudgeConfig` made real: the judge of this rank and the fits that re-predict attributes after it. Used
    by annotation (stage 2) and the bootstrap's labelling (stage 4), so both label the same way."""

    judge: BayesJudge
    fits: tuple[LinearFit, ...]

    @classmethod
    def open(
        cls, spec: JudgeConfig, schema: AttributeSchema, layout: ParallelLayout, verify: bool, key: str = "judge"
    ) -> Judging | None:
        """The judge (collective) and the fits of `refit`, learned from `refit_data` on every rank; None when
        `spec` names no checkpoint. `key` prefixes the keys errors name (`judge`, `bootstrap.judge`)."""
        if spec.checkpoint is None:
            return None
        judge = BayesJudge.from_checkpoint(
            spec.checkpoint,
            layout,
            spec.attributes,
            schema,
            micro_batch_size=spec.micro_batch_size,
            precision=spec.precision,
            verify=verify,
            key=f"{key}.checkpoint",
        )
        require_attributes(spec.refit, schema, f"{key}.refit")
        fits = tuple(
            fit_linear(read_records(str(spec.refit_data), spec.refit_format, schema), schema, name, spec.refit)
            for name in spec.refit
        )
        for fit in fits:
            log.info("%s.refit: %s", key, fit.describe())
        return cls(judge, fits)

    def describe(self) -> dict:
        """What shapes the labels, as JSON values: the checkpoint's step and checksums, attributes, fits."""
        loaded = self.judge.loaded
        return {
            "checkpoint": {"path": str(loaded.path), "step": loaded.step, "files": checkpoint_identity(loaded.path)},
            "attributes": list(self.judge.attributes),
            "micro_batch_size": self.judge.micro_batch_size,
            "scoring": self.judge.scoring,
            "fits": [asdict(fit) for fit in self.fits],
        }

    def rescore(
        self,
        records: Sequence[Conversation],
        positions: Sequence[tuple[int, int]],
        scores: np.ndarray,
        labels_of: LabelRule,
        rounded: Callable[[np.ndarray], list] = np.ndarray.tolist,
        lengths: LengthStats | None = None,
    ) -> np.ndarray:
        """`scores` (one row per (record, turn) of `positions`, schema order) with the judged attributes'
        columns replaced by the judge's posterior means, then the refit attributes' by their fits to the labels
        the turn is written with after judging (collective: every rank, the same records). `labels_of` gets a
        row as `rounded` gives it (annotate rounds to the decimals it writes).

        Turns are judged in order of their position, all conversations' first scored turns together, then the
        next: the judge reads each earlier turn with the labels it is written with, as stage 3 trains on it."""
        schema, out = self.judge.loaded.schema, scores.copy()
        written = {(r, t): labels_of(records[r].turns[t], values) for (r, t), values in zip(positions, rounded(scores))}
        columns = [schema.attributes.index(name) for name in self.judge.attributes]
        for position in sorted({t for _, t in positions}):
            members = [i for i, (_, t) in enumerate(positions) if t == position]
            turns = []
            for i in members:
                r, t = positions[i]
                record = records[r]
                context = tuple(
                    Turn(x.role, x.text, written.get((r, j), x.labels)) for j, x in enumerate(record.turns[:t])
                )
                turns.append(JudgedTurn(record.system, context, record.turns[t].text, written[(r, t)], record.source))
            out[np.ix_(members, columns)] = self.judge.scores(turns, lengths)
            for i in members:
                r, t = positions[i]
                for fit in self.fits:
                    labels = labels_of(records[r].turns[t], rounded(out[i]))
                    out[i, schema.attributes.index(fit.attribute)] = fit.predict(labels)
                written[(r, t)] = labels_of(records[r].turns[t], rounded(out[i]))
        return out
