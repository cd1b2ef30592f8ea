"""KV-cache text generation on a megatron GPTModel: batched prompts of any lengths, under tensor parallelism.

The loop is ours and short: it streams text per step, stops rows on stop tokens or stop strings, and drops
finished rows from the batch and the cache so long requests do not pay for short ones. The forward passes
with a KV cache are a decoder's (`steerlm.inference.decoders`): a lean loop over the model's own weights
for Llama-family models, megatron-core's static inference context for everything else.

Prompts of different lengths share one right-padded buffer. The first forward pass ("prefill") encodes
every prompt up to the shortest one's length; after that each step feeds one position, and a row whose
prompt is longer still takes its next prompt token instead of a sampled one. Positions and the causal
mask stay the plain ones of training, so no padding ever sits inside a sequence.

Under TP every rank runs the same loop on its shard: logits are gathered to the full vocabulary,
every rank samples from identical logits with identically seeded generators, and tensor-parallel rank 0's
tokens are broadcast so the ranks can never drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import torch
import torch.distributed as dist

from steerlm import runtime
from steerlm.config import ConfigError
from steerlm.inference.decoders import LeanDecoder, MegatronDecoder, lean_unsupported
from steerlm.runtime.layout import ParallelLayout
from steerlm.tokenizers import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued (OpenAI's names where they exist)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: off
    stop: tuple[str, ...] = ()  # stop strings, besides the generator's stop tokens; excluded from the text
    seed: int = 0  # sampling seed of this row (same seed, same prompt → same text)

    def validate(self) -> None:
        problems = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "stop": all(isinstance(s, str) and s for s in self.stop),
        }
        for name, ok in problems.items():
            if not ok:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: max_new_tokens >= 1, temperature >= 0, "
                    "top_k >= 0, 0 < top_p <= 1, stop strings non-empty"
                )


class FinishReason(str, Enum):
    stop = "stop"  # a stop token or stop string
    length = "length"  # max_new_tokens, or the model's maximum sequence length


@dataclass(frozen=True)
class Delta:
    """New text of one row at one step; `finish_reason` is set on the row's last delta."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    tokens: int = 0  # tokens the row has generated so far (stop token excluded): usage counts


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


class PromptTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(
            f"prompt {index} has {length} tokens; the model takes at most {limit - 1} before generating "
            f"(max_sequence_length {limit})"
        )
        self.index, self.length, self.limit = index, length, limit


@dataclass
class _Row:
    """One prompt's progress; text is decoded only when it is streamed or searched for stop strings."""

    index: int
    prompt: list[int]
    params: SamplingParams
    track_text: bool
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None
    prefix_offset: int = 0  # decoding restarts here, a step back, so context-dependent spacing stays right
    read_offset: int = 0  # the text of the tokens before this is in `text`

    def push(self, token: int, tokenizer: Tokenizer, stop_ids: frozenset[int], at_limit: bool) -> None:
        if token in stop_ids:
            self.finish = FinishReason.stop
        else:
            self.generated.append(token)
            if at_limit or len(self.generated) >= self.params.max_new_tokens:
                self.finish = FinishReason.length
        if self.track_text:
            self._extend_text(tokenizer)

    def _extend_text(self, tokenizer: Tokenizer) -> None:
        """Append the new tokens' text and look for stop strings in what changed: each step decodes the
        last few tokens, not the whole answer. Text ending in half a UTF-8 character (U+FFFD) waits for the
        next token, unless the row has finished."""
        searched = len(self.text)
        prefix = tokenizer.decode(self.generated[self.prefix_offset : self.read_offset])
        current = tokenizer.decode(self.generated[self.prefix_offset :])
        if len(current) > len(prefix) and (self.finish is not None or not current.endswith("\ufffd")):
            self.text += current[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.generated)
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
        return Delta(self.index, new, self.finish, len(self.generated))

    def completion(self, tokenizer: Tokenizer) -> Completion:
        """The finished row as a `Completion` (text decoded now unless it was tracked)."""
        if self.finish is None:
            raise RuntimeError(f"row {self.index} has not finished: decoding stopped before its last position")
        text = self.text if self.track_text else tokenizer.decode(self.generated)
        return Completion(len(self.prompt), self.generated, text, self.finish)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab]: argmax for temperature 0, else a draw from the
    temperature-scaled distribution restricted by top-k and top-p (per-row settings, one generator per row)."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if not drawn:
        return tokens
    rows = logits[drawn].float()
    temperature = torch.tensor([params[i].temperature for i in drawn], device=rows.device)
    ordered, order = torch.sort(rows / temperature[:, None], dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    rank = torch.arange(rows.shape[-1], device=rows.device)
    top_k = torch.tensor([params[i].top_k or rows.shape[-1] for i in drawn], device=rows.device)
    top_p = torch.tensor([params[i].top_p for i in drawn], device=rows.device)
    # a token stays if it is among the top k and the tokens before it hold less than top_p (the first always stays)
    keep = (rank[None, :] < top_k[:, None]) & ((probs.cumsum(-1) - probs) < top_p[:, None])
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cumulative = probs.cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=generators[i], device=generators[i].device) for i in drawn])
    picked = torch.searchsorted(cumulative, (uniform.to(rows.device) * cumulative[:, -1])[:, None], right=True)
    picked = picked.clamp(max=rows.shape[-1] - 1)
    tokens[drawn] = order.gather(1, picked).squeeze(1)
    return tokens


class Generator:
    """Batched KV-cache generation with one model replica (`model`: this rank's chunks, PP=1).

    Every tensor-parallel rank must call `stream`/`generate` with the same arguments and consume the
    whole stream (the steps are collective). A row stops at any of `stop_token_ids` or `stop_strings` (the
    end of turn of a `nemo`-tokenized model is text, several ids), besides its own stop strings.
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
    ) -> None:
        if layout.pp > 1 or len(model) != 1:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size",
                layout.pp,
                "generation runs one pipeline stage (the KV-cache loop is not pipelined)",
                "serve with parallel.pipeline_model_parallel_size=1 (and virtual stages off); "
                "checkpoints load at any layout, so use tensor parallelism to split a large model",
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
        reason = lean_unsupported(self.model)
        if decoder not in ("auto", "lean", "megatron"):
            raise ValueError(f"decoder={decoder!r}: choose auto, lean or megatron")
        if decoder == "lean" and reason:
            raise ValueError(f"decoder=lean cannot run this model: {reason}; use decoder=auto or megatron")
        self.decoder = MegatronDecoder if decoder == "megatron" or reason else LeanDecoder

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layout.tp > 1:
            group = self.layout.pg_collection.tp
            dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
        return tokens

    def _rows(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], track_text: bool) -> list[_Row]:
        """Checked before any compute, so a bad request fails alone and at once."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        for index, (prompt, setting) in enumerate(zip(prompts, params)):
            setting.validate()
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if len(prompt) >= self.max_sequence_length:
                raise PromptTooLong(index, len(prompt), self.max_sequence_length)
            bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {index} holds token id {bad[0]}, outside the tokenizer's [0, {self.tokenizer.vocab_size})"
                )
        settings = [replace(s, stop=tuple(dict.fromkeys(s.stop + self.stop_strings))) for s in params]
        return [_Row(i, list(p), s, track_text or bool(s.stop)) for i, (p, s) in enumerate(zip(prompts, settings))]

    def stream(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[list[Delta]]:
        """Per decoding step, the deltas of rows that produced text or finished (each row finishes once).

        Bad prompts or settings raise here, before the first step.
        """
        return self._decode(self._rows(prompts, params, track_text=True))

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        rows = self._rows(prompts, params, track_text=False)
        for _ in self._decode(rows):
            pass
        return [row.completion(self.tokenizer) for row in rows]

    def _decode(self, rows: list[_Row]) -> Iterator[list[Delta]]:
        device = self.layout.device
        lengths = [len(row.prompt) for row in rows]
        total = min(self.max_sequence_length, max(n + row.params.max_new_tokens for n, row in zip(lengths, rows)))
        buffer = torch.full((len(rows), total), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for slot, row in enumerate(rows):
            buffer[slot, : len(row.prompt)] = torch.tensor(row.prompt, dtype=torch.long)
        prompt_lengths = torch.tensor(lengths, device=device)
        generators = [torch.Generator(device=device).manual_seed(row.params.seed) for row in rows]
        start = min(lengths)
        training = self.model.training  # e.g. scoring inside a training run: restored afterwards
        self.model.eval()
        try:
            yield from self._steps(rows, buffer, prompt_lengths, generators, start, total)
        finally:
            self.model.train(training)

    def _steps(
        self,
        rows: list[_Row],
        buffer: torch.Tensor,
        prompt_lengths: torch.Tensor,
        generators: list[torch.Generator],
        start: int,
        total: int,
    ) -> Iterator[list[Delta]]:
        live = list(range(len(rows)))  # the rows still in the batch, in batch order
        # Inference mode is entered per step, never across a `yield`: the consumer's code runs outside it.
        with runtime.inference():
            decoder = self.decoder(self.model, self.layout, len(rows), total)
            logits = decoder.forward(buffer[:, :start], 0)[:, : self.tokenizer.vocab_size]
        for position in range(start, total):
            with runtime.inference():
                chosen = self._agree(sample(logits, [rows[i].params for i in live], [generators[i] for i in live]))
                generating = prompt_lengths <= position  # the others still read their prompt
                buffer[:, position] = torch.where(generating, chosen, buffer[:, position])
            new_tokens, generating_rows = buffer[:, position].tolist(), generating.tolist()
            deltas, keep = [], []
            for slot, index in enumerate(live):
                row = rows[index]
                if generating_rows[slot]:
                    row.push(new_tokens[slot], self.tokenizer, self.stop_token_ids, position == total - 1)
                    delta = row.delta() if row.track_text else None
                    if delta is not None:
                        deltas.append(delta)
                if row.finish is None:
                    keep.append(slot)
            if deltas:
                yield deltas
            if not keep:
                break
            with runtime.inference():
                if len(keep) < len(live):
                    buffer, prompt_lengths = buffer[keep], prompt_lengths[keep]
                    decoder.keep(keep)
                    live = [live[slot] for slot in keep]
                logits = decoder.forward(buffer[:, position : position + 1], position)[:, : self.tokenizer.vocab_size]
