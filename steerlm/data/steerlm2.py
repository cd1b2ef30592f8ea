"""SteerLM 2.0 rows: one prompt x, attributes a and n sampled responses with their log-probabilities.

The JSONL is NeMo-Aligner 0.7's (`SteerLM2Dataset`), so its users' files load and ours load there:

    {"system": "...",
     "prompt_turns": [{"from": "User", "value": "..."}, {"from": "Assistant", "value": "..."}, ...],
     "label": "helpfulness:4,...,verbosity:2",
     "responses": [{"from": "Assistant", "value": "y_1", "log(P(a|x,y))": -1.2, "log(P(y|x))": -40.1,
                    "log(Q(y|a,x))": -38.7}, ...]}

The prompt turns alternate User/Assistant, start and end with a user turn and carry no labels (NeMo-Aligner
renders them without attribute lines); the label is written exactly as the schema writes it, because it is
part of the tokens log Q'(y|a,x) was computed on. Every row of a file has the same number of responses.

A response is trained as the SteerLM template trains an answer: the prompt (system, turns, assistant header,
attribute line) is context and `{y}\\n<extra_id_1>` is trained, each response its own row with its own
positions. The fixed targets are w = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x)).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.collate import Batch, Example, pad_batch, tokenize
from steerlm.data.lengths import LengthStats
from steerlm.data.readers.core import BadRowPolicy, ReadStats, RejectSink, _read
from steerlm.data.records import Role, Turn, check_turn_text
from steerlm.data.template import Segment, SteerLMTemplate
from steerlm.errors import DataError
from steerlm.tokenizers.base import Tokenizer

LOG_P_ATTRIBUTES = "log(P(a|x,y))"  # the attribute model's log-probability of the requested attributes
LOG_P_RESPONSE = "log(P(y|x))"  # the unconditioned (plain-SFT) model's log-probability of the response
LOG_Q = "log(Q(y|a,x))"  # the sampling model's (stage-3 SteerLM) log-probability of the response
LOG_FIELDS = (LOG_P_ATTRIBUTES, LOG_P_RESPONSE, LOG_Q)


@dataclass(frozen=True)
class SampledResponse:
    text: str
    log_p_attributes: float
    log_p_response: float
    log_q: float
    extra: dict = field(default_factory=dict, compare=False)  # passthrough keys (e.g. raw attribute scores)


@dataclass(frozen=True)
class SteerLM2Row:
    system: str
    prompt_turns: tuple[Turn, ...]  # alternating, first and last a user turn, no labels
    labels: Labels | None  # None: no attribute line
    responses: tuple[SampledResponse, ...]
    source: str = ""  # "file:line"
    extra: dict = field(default_factory=dict, compare=False)

    def target_weights(self) -> list[float]:
        """w_i = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x)), in float64."""
        scores = [r.log_p_attributes + r.log_p_response - r.log_q for r in self.responses]
        top = max(scores)
        exps = [math.exp(score - top) for score in scores]
        total = sum(exps)
        return [value / total for value in exps]


def to_steerlm2_json(row: SteerLM2Row, schema: AttributeSchema) -> dict:
    return {
        "system": row.system,
        "prompt_turns": [{"from": turn.role.value, "value": turn.text} for turn in row.prompt_turns],
        "label": None if row.labels is None else schema.format(row.labels),
        "responses": [
            {
                "from": Role.assistant.value,
                "value": r.text,
                LOG_P_ATTRIBUTES: r.log_p_attributes,
                LOG_P_RESPONSE: r.log_p_response,
                LOG_Q: r.log_q,
                **r.extra,
            }
            for r in row.responses
        ],
        **row.extra,
    }


def _prompt_turns(value: object, source: str, line: int) -> tuple[Turn, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(source, line, "prompt_turns", "missing or empty", "give a list of {from, value} turns")
    turns = []
    for index, turn in enumerate(value):
        where = f"prompt_turns[{index}]"
        if not isinstance(turn, dict):
            raise DataError(source, line, where, "must be an object with from/value")
        expected = Role.user if index % 2 == 0 else Role.assistant
        if turn.get("from") != expected.value:
            problem = (
                f"{turn.get('from')!r}: prompt turns alternate User/Assistant from User; this one is {expected.value!r}"
            )
            raise DataError(source, line, f"{where}.from", problem)
        if turn.get("label") is not None:
            raise DataError(
                source,
                line,
                f"{where}.label",
                "prompt turns carry no labels (NeMo-Aligner renders them without attribute lines)",
                "remove it",
            )
        turns.append(Turn(expected, check_turn_text(expected, turn.get("value"), source, line, f"{where}.value")))
    if turns[-1].role != Role.user:
        raise DataError(source, line, "prompt_turns", "must end with the user turn the responses answer")
    return tuple(turns)


def _labels(value: object, schema: AttributeSchema, source: str, line: int) -> Labels | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(source, line, "label", "must be an attribute string or null")
    labels = schema.parse(value, source, line, "label")
    if schema.format(labels) != value:
        raise DataError(
            source,
            line,
            "label",
            f"{value!r} is not written as schema '{schema.name}' writes it ({schema.format(labels)!r}); the "
            "attribute line is part of the tokens log(Q(y|a,x)) was computed on",
            "write labels in the schema's order without spaces (recipes/prepare_steerlm2.py does)",
        )
    return labels


def _response(value: object, source: str, line: int, where: str) -> SampledResponse:
    if not isinstance(value, dict):
        raise DataError(source, line, where, "must be an object with from/value and the three log-probabilities")
    if value.get("from") != Role.assistant.value:
        raise DataError(source, line, f"{where}.from", f"{value.get('from')!r}: responses are 'Assistant' turns")
    text = check_turn_text(Role.assistant, value.get("value"), source, line, f"{where}.value")
    logs: dict[str, float] = {}
    for name in LOG_FIELDS:
        number = value.get(name)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise DataError(source, line, f"{where}.{name}", f"{number!r} is not a finite number")
        logs[name] = float(number)
    extra = {k: v for k, v in value.items() if k not in ("from", "value", *LOG_FIELDS)}
    return SampledResponse(text, logs[LOG_P_ATTRIBUTES], logs[LOG_P_RESPONSE], logs[LOG_Q], extra=extra)


def from_steerlm2_json(obj: Mapping[str, object], schema: AttributeSchema, source: str, line: int) -> SteerLM2Row:
    """Parse one row, naming file:line and the field on any problem."""
    system = obj.get("system")
    if not isinstance(system, str):
        raise DataError(source, line, "system", "missing or not a string")
    turns = _prompt_turns(obj.get("prompt_turns"), source, line)
    labels = _labels(obj.get("label"), schema, source, line)
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses:
        raise DataError(source, line, "responses", "missing or empty", "give the sampled responses of this prompt")
    sampled = tuple(_response(r, source, line, f"responses[{i}]") for i, r in enumerate(responses))
    known = {"system", "prompt_turns", "label", "responses"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return SteerLM2Row(system, turns, labels, sampled, f"{source}:{line}", extra)


def read_steerlm2_rows(
    path: str | Path,
    schema: AttributeSchema,
    on_bad_row: BadRowPolicy = BadRowPolicy.error,
    rejects: RejectSink | None = None,
    stats: ReadStats | None = None,
) -> Iterator[SteerLM2Row]:
    """SteerLM 2.0 rows of a JSONL (plain or gzip) or parquet file, streamed; the reader policy of
    `read_records` (bad rows raise or go to `rejects`). A row whose response count differs from the first
    row's is bad: a file holds groups of one size."""
    sizes: list[int] = []  # the first good row's response count

    def convert(obj: Mapping[str, object], schema: AttributeSchema, source: str, line: int) -> list[SteerLM2Row]:
        row = from_steerlm2_json(obj, schema, source, line)
        if sizes and len(row.responses) != sizes[0]:
            raise DataError(
                source,
                line,
                "responses",
                f"has {len(row.responses)} responses, the file's first row {sizes[0]}",
                "sample the same number of responses for every prompt",
            )
        sizes[:] = [len(row.responses)]
        return [row]

    stats = ReadStats() if stats is None else stats
    if on_bad_row == BadRowPolicy.reject and rejects is None:
        raise ValueError("on_bad_row='reject' needs a RejectSink, otherwise rejected rows would vanish")
    return _read(Path(path), convert, schema, BadRowPolicy(on_bad_row), rejects, stats)


def response_example(
    template: SteerLMTemplate,
    tokenizer: Tokenizer,
    system: str,
    prompt_turns: Sequence[Turn],
    labels: Labels | None,
    text: str,
    source: str = "",
) -> Example:
    """The tokens of `text` answering the prompt: the prompt is context, `{text}\\n<extra_id_1>` is trained.

    The prompt's segments are those generation starts from (`template.inference_segments`); with a template
    that does not condition on attributes (the plain-SFT model's) there is no attribute line. Under `nemo`
    tokenization this is NeMo-Aligner's SteerLM 2.0 example (joined text, the prompt's id count masked).
    """
    config = template.config
    prompt = template.inference_segments(system, list(prompt_turns), labels)
    segments = [Segment(s.text, False) for s in prompt] + [
        Segment(text + config.turn_suffix + config.end_of_turn, True)
    ]
    return tokenize(segments, tokenizer, template.config.tokenization, source)


@dataclass(frozen=True)
class ResponseGroup:
    """One prompt's responses, tokenised for training, with their targets w and log Q'."""

    examples: tuple[Example, ...]
    target_weights: tuple[float, ...]
    log_q: tuple[float, ...]
    source: str

    @property
    def size(self) -> int:
        return len(self.examples)


def response_groups(
    rows: Sequence[SteerLM2Row], template: SteerLMTemplate, tokenizer: Tokenizer, seq_length: int, stats: LengthStats
) -> list[ResponseGroup]:
    """Training groups of `rows`; a row with any response longer than `seq_length` positions is left out
    whole (counted in `stats`): cutting a response would change the tokens its log-probabilities are of."""
    groups = []
    for row in rows:
        stats.examples += 1
        examples = tuple(
            response_example(template, tokenizer, row.system, row.prompt_turns, row.labels, r.text, row.source)
            for r in row.responses
        )
        if any(example.positions > seq_length for example in examples):
            stats.dropped["a response longer than seq_length"] += 1
            continue
        stats.kept += 1
        weights = tuple(row.target_weights())
        groups.append(ResponseGroup(examples, weights, tuple(r.log_q for r in row.responses), row.source))
    return groups


def group_batch(groups: Sequence[ResponseGroup], pad_id: int, length_multiple: int = 1) -> Batch:
    """`[len(groups) x n, length]` rows, prompt g's responses at rows g*n … g*n+n-1, right-padded to the
    longest (rounded up to `length_multiple`), plus per row `target_weight` and `log_q` (float64) and
    `group_size` (n), what `steerlm.training.losses.STEERLM2` reads."""
    examples = [example for group in groups for example in group.examples]
    longest = max(example.positions for example in examples)
    batch = pad_batch(examples, pad_id, -(-longest // length_multiple) * length_multiple)
    batch["target_weight"] = torch.tensor([w for g in groups for w in g.target_weights], dtype=torch.float64)
    batch["log_q"] = torch.tensor([q for g in groups for q in g.log_q], dtype=torch.float64)
    batch["group_size"] = torch.full((len(examples),), groups[0].size, dtype=torch.long)
    return batch


def blank_group(size: int, pad_id: int) -> ResponseGroup:
    """A group with no trained token: it fills a last validation batch and counts for nothing."""
    blank = Example((pad_id, pad_id), (False, False))
    return ResponseGroup((blank,) * size, (1.0 / size,) * size, (0.0,) * size, "")


def validation_group_batches(
    groups: Sequence[ResponseGroup], pad_id: int, prompts: int, length_multiple: int = 1
) -> list[Batch]:
    """Every validation group once, `prompts` per batch (the last filled with blank groups)."""
    batches = []
    for start in range(0, len(groups), prompts):
        chunk = list(groups[start : start + prompts])
        chunk += [blank_group(chunk[0].size, pad_id)] * (prompts - len(chunk))
        batches.append(group_batch(chunk, pad_id, length_multiple))
    return batches


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution's CDF at x (a, b > 0), by its continued fraction (Lentz's method),
    evaluated on the side of the mean where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float, iterations: int = 500, tolerance: float = 1e-15) -> float:
    tiny = 1e-300

    def guard(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, iterations + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d, c = 1.0 / guard(1.0 + even * d), guard(1.0 + even / c)
        fraction *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d, c = 1.0 / guard(1.0 + odd * d), guard(1.0 + odd / c)
        fraction *= d * c
        if abs(d * c - 1.0) < tolerance:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def attribute_level_log_probability(score: float, level: float, schema: AttributeSchema, concentration: float) -> float:
    """log P(attribute = level | x, y) from a regression APM's predicted `score` (HelpSteer2's SteerLM 2.0).

    The schema's K integer levels split [0, 1] into K equal bins, level k owning [k/K, (k+1)/K] (levels counted
    from `min_value`). The score, clipped to the schema's range, is the mean of a Beta distribution,
    mu = (score - min_value + 1/2) / K (a score exactly on a level sits at the centre of that level's bin), with
    alpha + beta = `concentration`: alpha = mu * concentration, beta = (1 - mu) * concentration. A level's
    probability is the Beta mass of its bin; bins above the mean are integrated from the upper tail so small
    probabilities keep their digits.
    """
    levels = int(schema.max_value - schema.min_value) + 1
    clipped = min(max(score, schema.min_value), schema.max_value)
    mean = (clipped - schema.min_value + 0.5) / levels
    alpha, beta = mean * concentration, (1.0 - mean) * concentration
    low, high = (level - schema.min_value) / levels, (level - schema.min_value + 1) / levels
    if low >= mean:
        mass = regularized_incomplete_beta(beta, alpha, 1.0 - low) - regularized_incomplete_beta(
            beta, alpha, 1.0 - high
        )
    else:
        mass = regularized_incomplete_beta(alpha, beta, high) - regularized_incomplete_beta(alpha, beta, low)
    return math.log(max(mass, sys.float_info.min))


def attributes_log_probability(
    scores: Sequence[float], labels: Labels, schema: AttributeSchema, concentration: float
) -> float:
    """log P(a | x, y): the sum over the attributes `labels` sets of `attribute_level_log_probability` (the
    attributes are taken as independent given the response); `scores` are the APM's, in schema order."""
    return sum(
        attribute_level_log_probability(score, level, schema, concentration)
        for name, score in zip(schema.attributes, scores)
        if (level := labels.get(name)) is not None
    )
