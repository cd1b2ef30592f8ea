"""KV-cache text generation on a megatron GPTModel: a batch that rows join and leave, under tensor parallelism.

The loop is ours and short (`Decoding`): it streams text per step, stops rows on stop tokens or stop
strings, lets new rows join between steps and drops finished (or cancelled) rows from the batch and the
cache, so a short request never waits for a long one (continuous batching). The forward passes with a
KV cache are a decoder's (`steerlm.inference.decoders`): a lean loop over the model's own weights for
Llama-family models, megatron-core's static inference context for everything else.

A joining row's prompt is encoded whole ("prefill"), and from then on every step feeds each row one token
at its own position. Each row samples with its own `torch.Generator`, seeded by its `seed`, which draws only
when that row samples a token: a row's text depends on its prompt and settings, never on what else is in
the batch or when it joined.

Under TP every rank runs the same loop on its shard: logits are gathered to the full vocabulary,
every rank samples from identical logits with identically seeded generators, and tensor-parallel rank 0's
tokens are broadcast so the ranks can never drift apart. Every rank must make the same `advance` calls
(`steerlm.inference.lockstep`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.config.inference import (
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    PREFILL_TOKENS,
    SEED_LIMIT,
    TOP_K_LIMIT,
)
from steerlm.inference.decoders import LeanDecoder, MegatronDecoder, PromptLogits, lean_unsupported
from steerlm.megatron_compat.scaled_rope import ScaledRotaryEmbedding
from steerlm.runtime.layout import ParallelLayout
from steerlm.tokenizers import Tokenizer

if TYPE_CHECKING:
    from steerlm.inference.adapters import AdapterBank


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued (OpenAI's names where they exist)."""

    max_new_tokens: int = 256  # 0: the prompt only (scored with prompt_logprobs), the row finishes at its prefill
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: off
    stop: tuple[str, ...] = ()  # stop strings, besides the generator's stop tokens; excluded from the text
    seed: int = 0  # sampling seed of this row (same seed, same prompt → same text)
    logprobs: bool = False  # report each generated token's log-probability (`TokenLogprob`)
    top_logprobs: int = 0  # ... and that many of the most likely tokens at its position (needs a kind of logprobs)
    prompt_logprobs: bool = False  # report each prompt token's (after the first) given the tokens before it
    text_after_prompt: bool = False  # decode the text as the prompt's continuation (see `_Row`), not on its own

    def validate(self) -> None:
        problems = {
            "max_new_tokens": self.max_new_tokens >= 0,
            "temperature": self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf,
            "top_k": 0 <= self.top_k < TOP_K_LIMIT,
            "top_p": MIN_TOP_P <= self.top_p <= 1,
            "stop": all(isinstance(s, str) and s for s in self.stop),
            "seed": 0 <= self.seed < SEED_LIMIT,
            "top_logprobs": 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS
            and (self.logprobs or self.prompt_logprobs or not self.top_logprobs),
        }
        for name, ok in problems.items():
            if not ok:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: max_new_tokens >= 0, temperature 0 or >= "
                    f"{MIN_TEMPERATURE:g}, 0 <= top_k < 2**63, {MIN_TOP_P:g} <= top_p <= 1, stop strings "
                    f"non-empty, 0 <= seed < 2**63, 0 <= top_logprobs <= {MAX_TOP_LOGPROBS} and only with logprobs or "
                    "prompt_logprobs"
                )


class FinishReason(str, Enum):
    stop = "stop"  # a stop token or stop string
    length = "length"  # max_new_tokens, or the model's maximum sequence length


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's natural-log probability under the model, and the `top_logprobs` most likely tokens
    at its position (id, log-probability), most likely first.

    The distribution is the model's own (log-softmax of its logits), before temperature, top-k and top-p
    reshape it for sampling, so the numbers score the text whatever the sampling settings (vLLM's default,
    `raw_logprobs`, does the same); a greedy token is the first of its `top`."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text of one row at one step; `finish_reason` is set on the row's last delta. `logprobs`: those of
    the tokens generated since the row's last delta (with `SamplingParams.logprobs`), in order; a row's
    deltas together carry one per generated token (the stop token excluded, as in `tokens`). `token_ids`:
    those tokens' ids, which a stop string's text may have left out of `text`; `stop_token`, on the last
    delta of a row that a stop token ended, that token, and with `logprobs` its `stop_logprob`.
    `prompt_logprobs`, on a row's first delta (with `SamplingParams.prompt_logprobs`): one per prompt token
    after the first."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    tokens: int = 0  # tokens the row has generated so far (stop token excluded): usage counts
    logprobs: tuple[TokenLogprob, ...] = ()
    token_ids: tuple[int, ...] = ()
    stop_token: int | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    stop_logprob: TokenLogprob | None = None


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first, if asked for


class PromptTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(
            f"prompt {index} has {length} tokens; the model takes at most {limit - 1} before generating "
            f"(max_sequence_length {limit})"
        )
        self.index, self.length, self.limit = index, length, limit


# Prompt tokens a row's text is decoded after with `SamplingParams.text_after_prompt` (HF's incremental
# detokenizer starts 5 tokens back, as does vLLM's): enough for a token's text to depend on what precedes it.
TEXT_CONTEXT_TOKENS = 5


@dataclass
class _Row:
    """One prompt's progress; text is decoded only when it is streamed or searched for stop strings.

    The text is that of `context + generated` past the context's own text: with no context (a chat answer,
    which starts a turn of its own) a SentencePiece tokenizer drops the first token's word-boundary space,
    as it drops a text's leading one; with the prompt's last tokens as context (`text_after_prompt`: a raw
    completion), the text is what the answer adds to the prompt's text, that space included."""

    index: int
    prompt: list[int]
    params: SamplingParams
    track_text: bool
    prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs; sent on the first delta
    prompt_logprobs_sent: bool = False
    context: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None
    prefix_offset: int = 0  # in context + generated: decoding restarts here, a step back, so spacing stays right
    read_offset: int = 0  # in context + generated: the text of the tokens before this is in `text`
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, with params.logprobs
    logprobs_emitted: int = 0
    ids_emitted: int = 0
    stop_token: int | None = None  # the stop token that ended the row
    stop_logprob: TokenLogprob | None = None  # its log-probability, with params.logprobs

    def __post_init__(self) -> None:
        self.read_offset = len(self.context)

    def _decode(self, tokenizer: Tokenizer, start: int, end: int | None = None) -> str:
        """The text of `context + generated` [start:end]."""
        ids = self.context[start:end] + self.generated[max(start - len(self.context), 0) :]
        if end is not None:
            ids = ids[: end - start]
        return tokenizer.decode(ids)

    def push(
        self,
        token: int,
        tokenizer: Tokenizer,
        stop_ids: frozenset[int],
        at_limit: bool,
        logprob: TokenLogprob | None = None,
    ) -> None:
        if token in stop_ids:
            self.finish, self.stop_token, self.stop_logprob = FinishReason.stop, token, logprob
        else:
            self.generated.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if at_limit or len(self.generated) >= self.params.max_new_tokens:
                self.finish = FinishReason.length
        if self.track_text:
            self._extend_text(tokenizer)

    def _extend_text(self, tokenizer: Tokenizer) -> None:
        """Append the new tokens' text and look for stop strings in what changed: each step decodes the
        last few tokens, not the whole answer. Text ending in half a UTF-8 character (U+FFFD) waits for the
        next token, unless the row has finished."""
        searched = len(self.text)
        prefix = self._decode(tokenizer, self.prefix_offset, self.read_offset)
        current = self._decode(tokenizer, self.prefix_offset)
        if len(current) > len(prefix) and (self.finish is not None or not current.endswith("\ufffd")):
            self.text += current[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.context) + len(self.generated)
        start = max(0, searched - max((len(s) for s in self.params.stop), default=1) + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], FinishReason.stop

    def delta(self) -> Delta | None:
        """Text that can no longer change, or None: a possible start of a stop string is held back until
        the row goes on or ends."""
        safe = len(self.text)
        if self.finish is None:
            safe -= max((len(s) - 1 for s in self.params.stop), default=0)
            if safe <= self.emitted:
                return None
        new, self.emitted = self.text[self.emitted : safe], max(safe, self.emitted)
        return self.next_delta(new)

    def next_delta(self, text: str = "") -> Delta:
        """The row's next delta: `text`, and the token ids and log-probabilities not yet sent."""
        logprobs, self.logprobs_emitted = tuple(self.logprobs[self.logprobs_emitted :]), len(self.logprobs)
        ids, self.ids_emitted = tuple(self.generated[self.ids_emitted :]), len(self.generated)
        scored = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            scored, self.prompt_logprobs_sent = tuple(self.prompt_logprobs), True
        return Delta(
            self.index,
            text,
            self.finish,
            len(self.generated),
            logprobs,
            ids,
            self.stop_token,
            scored,
            self.stop_logprob,
        )

    def completion(self, tokenizer: Tokenizer) -> Completion:
        """The finished row as a `Completion` (text decoded now unless it was tracked)."""
        if self.finish is None:
            raise RuntimeError(f"row {self.index} has not finished: decoding stopped before its last position")
        if self.track_text:
            text = self.text
        else:
            text = self._decode(tokenizer, 0)[len(self._decode(tokenizer, 0, len(self.context))) :]
        logprobs = self.logprobs if self.params.logprobs else None
        return Completion(len(self.prompt), self.generated, text, self.finish, logprobs, self.prompt_logprobs)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab]: argmax for temperature 0, else a draw from the
    temperature-scaled distribution restricted by top-k and top-p (per-row settings, one generator per row,
    which draws once for its row and is untouched by greedy rows).

    The kept tokens are found in probability order, but the draw walks them in vocabulary order: in probability
    order, two tokens whose logits differ by a rounding error (another TP size, another kernel) can swap places and
    move every boundary between them by a whole token's probability, so one draw in a flat distribution picks
    another token; in vocabulary order a rounding error moves the boundaries by as much as itself."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if not drawn:
        return tokens
    rows = logits[drawn].float()
    temperature = torch.tensor([params[i].temperature for i in drawn], device=rows.device)
    probs = torch.softmax(rows / temperature[:, None], dim=-1)
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(rows.shape[-1], device=rows.device)
    top_k = torch.tensor([min(params[i].top_k or rows.shape[-1], rows.shape[-1]) for i in drawn], device=rows.device)
    top_p = torch.tensor([params[i].top_p for i in drawn], device=rows.device)
    # a token stays if it is among the top k and the tokens before it hold less than top_p (the first always stays)
    keep_ordered = (rank[None, :] < top_k[:, None]) & ((ordered.cumsum(-1) - ordered) < top_p[:, None])
    keep = torch.zeros_like(keep_ordered).scatter(1, order, keep_ordered)
    cumulative = torch.where(keep, probs, torch.zeros_like(probs)).cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=generators[i], device=generators[i].device) for i in drawn])
    picked = torch.searchsorted(cumulative, (uniform.to(rows.device) * cumulative[:, -1])[:, None], right=True)
    last_kept = torch.where(keep, rank, torch.zeros_like(rank)).amax(-1, keepdim=True)
    tokens[drawn] = torch.minimum(picked, last_kept).squeeze(1)  # a draw rounded up to the total: the last kept
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> list[TokenLogprob]:
    """Per row of `logits` [rows, vocab]: the log-probability of its token in `tokens` under the model's
    distribution (log-softmax in float32) and its `top[row]` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None].to(logprobs.device)).squeeze(1).tolist()
    most = max(top, default=0)
    values, ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(int(token), chosen[row], tuple(zip(top_ids[row][: top[row]], top_values[row][: top[row]])))
        for row, token in enumerate(tokens.tolist())
    ]


PROMPT_SPAN = 256  # prompt positions whose full-vocabulary logits are made at once for prompt log-probabilities


def prompt_token_logprobs(logits: PromptLogits, prompt: Sequence[int], top: int, vocab: int) -> list[TokenLogprob]:
    """Each prompt token after the first: its log-probability given the tokens before it (the model's
    distribution, as `token_logprobs`) and the `top` most likely tokens at its position."""
    out: list[TokenLogprob] = []
    for span in logits.chunks(PROMPT_SPAN):
        start = len(out) + 1
        targets = torch.tensor(prompt[start : start + span.shape[0]], device=span.device)
        out += token_logprobs(span[:, :vocab], targets, [top] * span.shape[0])
    return out


class RowFailed(RuntimeError):
    """A row that passed its checks failed while decoding (its prefill or its sampling); it left the batch."""


@dataclass(frozen=True)
class RowRequest:
    """A row to join a `Decoding`: `key` names it in the outcomes (unique among the rows decoding)."""

    key: int
    prompt: Sequence[int]
    params: SamplingParams
    adapter: int = 0  # its LoRA adapter in the generator's AdapterBank (0: the model alone)


@dataclass
class StepOutcome:
    """What one `Decoding.advance` did. `deltas`: per row that produced text or finished (`Delta.index` is
    the row's key; each row finishes once). `finished`: the rows that finished, for their completions.
    `failed`: rows refused or failed at this step (the others went on), with the reason."""

    deltas: list[Delta] = field(default_factory=list)
    finished: list[_Row] = field(default_factory=list)
    failed: list[tuple[int, Exception]] = field(default_factory=list)
    stepped: bool = False  # whether any row sampled a token


class Generator:
    """Batched KV-cache generation with one model replica (`model`: this rank's chunk, one per pipeline stage).

    Every tensor- and pipeline-parallel rank must call `stream`/`generate` with the same arguments and consume
    the whole stream (the steps are collective). Under PP the lean decoder runs the stages in turn. A row stops
    at any of `stop_token_ids` or `stop_strings` (the end of turn of a `nemo`-tokenized model is text, several
    ids), besides its own stop strings.
    """

    def __init__(
        self,
        model: list[torch.nn.Module],
        tokenizer: Tokenizer,
        layout: ParallelLayout,
        max_sequence_length: int,
        stop_token_ids: Sequence[int],
        decoder: str = "auto",
        stop_strings: Sequence[str] = (),
        adapters: AdapterBank | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        if len(model) != 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size",
                len(model),
                "generation runs one model chunk per pipeline stage",
                "unset parallel.virtual_pipeline_model_parallel_size for generation (checkpoints load at any layout)",
            )
        if layout.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel",
                True,
                "splits the sequence, but decoding feeds one position per step",
                "set parallel.sequence_parallel=false for inference",
            )
        self.model = model[0]
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_sequence_length = max_sequence_length
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_strings = tuple(stop_strings)  # stop every row, besides its own stop strings
        self.prefill_tokens = prefill_tokens  # the lean decoder's prefill chunks (`LeanDecoder._prefill`)
        reason = lean_unsupported(self.model)
        if decoder not in ("auto", "lean", "megatron"):
            raise ValueError(f"decoder={decoder!r}: choose auto, lean or megatron")
        if decoder == "lean" and reason:
            raise ValueError(f"decoder=lean cannot run this model: {reason}; use decoder=auto or megatron")
        if layout.pp > 1 and (reason or decoder == "megatron"):
            raise ConfigError(
                "parallel.pipeline_model_parallel_size",
                layout.pp,
                "pipelined generation runs in the lean decoder, "
                + (f"which cannot run this model: {reason}" if reason else "and decoder=megatron was chosen"),
                "serve with parallel.pipeline_model_parallel_size=1; checkpoints load at any layout, so use "
                "tensor parallelism to split the model",
            )
        self.decoder = MegatronDecoder if decoder == "megatron" or reason else LeanDecoder
        rope = getattr(self.model, "rotary_pos_emb", None)
        if self.decoder is MegatronDecoder and isinstance(rope, ScaledRotaryEmbedding):
            if rope.is_long(max_sequence_length):
                raise ValueError(
                    f"decoder=megatron rotates every position of this LongRoPE model with the factors of its longest "
                    f"sequence ({max_sequence_length} positions: the long ones), unlike transformers on sequences of "
                    f"up to {rope.original_max_positions}; use decoder=auto or lean, or at most that many positions"
                )
        self.adapters: AdapterBank | None = None
        if adapters is not None:
            self.use_adapters(adapters)

    def use_adapters(self, adapters: AdapterBank) -> None:
        """Let rows use the LoRA adapters of `adapters` (`RowRequest.adapter`); the lean decoder runs them."""
        if self.decoder is not LeanDecoder:
            reason = lean_unsupported(self.model) or "another decoder was chosen"
            raise ValueError(f"LoRA adapters per row run in the lean decoder, which cannot run this model: {reason}")
        self.adapters = adapters

    def new_decoder(self) -> LeanDecoder | MegatronDecoder:
        """An empty decoder for this generator's model (with its adapters)."""
        if self.decoder is LeanDecoder:
            return LeanDecoder(
                self.model, self.layout, self.max_sequence_length, self.adapters, prefill_tokens=self.prefill_tokens
            )
        return self.decoder(self.model, self.layout, self.max_sequence_length)

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every model-parallel rank continues with the same tokens: TP rank 0's, then (PP) the last stage's."""
        if self.layout.tp > 1:
            group = self.layout.pg_collection.tp
            dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
        if self.layout.pp > 1:
            group = self.layout.pg_collection.pp
            dist.broadcast(tokens, src=dist.get_global_rank(group, self.layout.pp - 1), group=group)
        return tokens

    def check(self, prompt: Sequence[int], params: SamplingParams, index: int = 0) -> None:
        """Raise (ValueError, PromptTooLong) if the row cannot be decoded; `index` names it in the message."""
        params.validate()
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        if len(prompt) >= self.max_sequence_length:
            raise PromptTooLong(index, len(prompt), self.max_sequence_length)
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {index} holds token id {bad[0]}, outside the tokenizer's [0, {self.tokenizer.vocab_size})"
            )

    def _requests(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[RowRequest]:
        """Every row checked before any compute, so a bad one fails the call at once."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        for index, (prompt, setting) in enumerate(zip(prompts, params)):
            self.check(prompt, setting, index)
        return [RowRequest(i, list(p), s) for i, (p, s) in enumerate(zip(prompts, params))]

    def stream(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[list[Delta]]:
        """Per decoding step, the deltas of rows that produced text or finished (each row finishes once).

        Bad prompts or settings raise here, before the first step.
        """
        requests = self._requests(prompts, params)
        return (outcome.deltas for outcome in self._run(Decoding(self, track_text=True), requests) if outcome.deltas)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        requests = self._requests(prompts, params)
        rows: dict[int, _Row] = {}
        for outcome in self._run(Decoding(self, track_text=False), requests):
            rows.update((row.index, row) for row in outcome.finished)
        return [rows[i].completion(self.tokenizer) for i in range(len(requests))]

    def _run(self, decoding: Decoding, requests: list[RowRequest]) -> Iterator[StepOutcome]:
        training = self.model.training  # e.g. scoring inside a training run: restored afterwards
        self.model.eval()
        try:
            outcome = decoding.advance(requests)
            while True:
                if outcome.failed:
                    raise outcome.failed[0][1]
                yield outcome
                if not decoding.rows:
                    return
                outcome = decoding.advance()
        finally:
            self.model.train(training)


class Decoding:
    """A running batch that rows join and leave between steps: one `advance` is one step of every row.

    Rows join with their prompt encoded whole; each step samples every row's next token from its logits and
    feeds the tokens of the rows that go on. A row leaves when it finishes, or when the caller names it
    (a cancelled request). `track_text=False` decodes text only where stop strings need it (`generate`).
    Under TP every rank must make the same calls in the same order.
    """

    def __init__(self, generator: Generator, track_text: bool = True) -> None:
        self.generator, self.track_text = generator, track_text
        self.rows: list[_Row] = []  # in the decoder's row order
        self.generators: list[torch.Generator] = []
        self.decoder: LeanDecoder | MegatronDecoder | None = None
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.steps = 0  # steps that sampled tokens

    def advance(self, joins: Sequence[RowRequest] = (), leaves: Collection[int] = ()) -> StepOutcome:
        """Drop the rows named in `leaves`, add `joins` (a row that fails its checks or its prefill is
        refused alone), then one step of every row. A failing forward pass empties the batch and raises."""
        outcome = StepOutcome()
        model = self.generator.model
        training = model.training  # e.g. scoring inside a training run: restored afterwards
        if training:  # switching modes walks every module: not once per step of an inference-only model
            model.eval()
        try:
            self._keep([slot for slot, row in enumerate(self.rows) if row.index not in leaves])
            self._join(joins, outcome)
            if self.rows:
                self._step(outcome)
        except Exception:
            self.rows, self.generators, self.decoder, self.logits = [], [], None, None
            raise
        finally:
            if training:
                model.train()
        return outcome

    def _keep(self, slots: list[int]) -> None:
        if len(slots) == len(self.rows):
            return
        self.rows = [self.rows[slot] for slot in slots]
        self.generators = [self.generators[slot] for slot in slots]
        if self.decoder is not None and self.logits is not None:
            self.decoder.keep(slots)
            self.logits = self.logits[slots]

    def _join(self, joins: Sequence[RowRequest], outcome: StepOutcome) -> None:
        generator = self.generator
        valid = []
        for request in joins:
            try:
                generator.check(request.prompt, request.params, request.key)
                valid.append(request)
            except ValueError as error:
                outcome.failed.append((request.key, error))
        if not valid:
            return
        if not self.rows:  # a fresh cache, sized for the rows to come
            self.decoder = generator.new_decoder()
            self.logits = None
        groups = [valid]
        while groups:
            group = groups.pop(0)
            try:
                self._prefill(group)
            except Exception as error:  # noqa: BLE001 - fails these rows; retried alone to find the culprit
                if len(group) > 1:
                    groups += [[request] for request in group]
                else:
                    failure = RowFailed(f"its prefill failed: {type(error).__name__}: {error}")
                    outcome.failed.append((group[0].key, failure))
        # rows with nothing to generate (a prompt to score) finish at their prefill
        done = [slot for slot, row in enumerate(self.rows) if row.params.max_new_tokens == 0]
        for slot in done:
            row = self.rows[slot]
            row.finish = FinishReason.length
            outcome.deltas.append(row.next_delta())
            outcome.finished.append(row)
        if done:
            self._keep([slot for slot in range(len(self.rows)) if slot not in done])

    def _prefill(self, requests: list[RowRequest]) -> None:
        generator, vocab = self.generator, self.generator.tokenizer.vocab_size
        length = max(min(generator.max_sequence_length, len(r.prompt) + r.params.max_new_tokens) for r in requests)
        assert self.decoder is not None
        scored = [i for i, request in enumerate(requests) if request.params.prompt_logprobs]
        with runtime.inference():
            adapters = [r.adapter for r in requests] if any(r.adapter for r in requests) else None
            logits, prompt_logits = self.decoder.add([r.prompt for r in requests], length, scored, adapters)
            logits = logits[:, :vocab]
            prompt_logprobs = {
                i: prompt_token_logprobs(prompt_logits[i], requests[i].prompt, requests[i].params.top_logprobs, vocab)
                for i in scored
            }
        self.logits = logits if self.logits is None else torch.cat((self.logits, logits))
        device = generator.layout.device
        for i, request in enumerate(requests):
            params = replace(request.params, stop=tuple(dict.fromkeys(request.params.stop + generator.stop_strings)))
            track = self.track_text or bool(params.stop)
            context = list(request.prompt[-TEXT_CONTEXT_TOKENS:]) if params.text_after_prompt else []
            row = _Row(request.key, list(request.prompt), params, track, prompt_logprobs.get(i), context=context)
            self.rows.append(row)
            self.generators.append(torch.Generator(device=device).manual_seed(request.params.seed))

    def _sample(self, failed: dict[int, Exception]) -> torch.Tensor:
        """Every row's next token; a row whose settings make sampling fail is named in `failed` alone."""
        assert self.logits is not None
        params = [row.params for row in self.rows]
        try:
            return sample(self.logits, params, self.generators)
        except Exception:  # noqa: BLE001 - find the rows that fail on their own; the others go on
            tokens = self.logits.argmax(dim=-1)
            for slot in range(len(self.rows)):
                try:
                    tokens[slot] = sample(
                        self.logits[slot : slot + 1], params[slot : slot + 1], self.generators[slot : slot + 1]
                    )[0]
                except Exception as error:  # noqa: BLE001
                    failed[slot] = RowFailed(f"its sampling failed: {type(error).__name__}: {error}")
            return tokens

    def _logprobs(self, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """The sampled tokens' log-probabilities, by slot, for the rows that asked for them."""
        slots = [slot for slot, row in enumerate(self.rows) if row.params.logprobs]
        if not slots:
            return {}
        assert self.logits is not None
        top = [self.rows[slot].params.top_logprobs for slot in slots]
        return dict(zip(slots, token_logprobs(self.logits[slots], tokens[slots], top)))

    def _step(self, outcome: StepOutcome) -> None:
        generator = self.generator
        failed: dict[int, Exception] = {}
        with runtime.inference():
            agreed = generator._agree(self._sample(failed))
            logprobs = self._logprobs(agreed)
        tokens = agreed.tolist()
        self.steps, outcome.stepped = self.steps + 1, True
        keep = []
        for slot, (row, token) in enumerate(zip(self.rows, tokens)):
            if slot in failed:
                outcome.failed.append((row.index, failed[slot]))
                continue
            at_limit = len(row.prompt) + len(row.generated) == generator.max_sequence_length - 1
            row.push(token, generator.tokenizer, generator.stop_token_ids, at_limit, logprobs.get(slot))
            delta = row.delta() if row.track_text else None
            if delta is None and row.finish is not None:
                delta = row.next_delta()
            if delta is not None:
                outcome.deltas.append(delta)
            if row.finish is None:
                keep.append(slot)
            else:
                outcome.finished.append(row)
        fed = [tokens[slot] for slot in keep]
        self._keep(keep)
        if self.rows:
            assert self.decoder is not None
            with runtime.inference():
                step = self.decoder.step(torch.tensor(fed, dtype=torch.long, device=generator.layout.device))
                self.logits = step[:, : generator.tokenizer.vocab_size]
