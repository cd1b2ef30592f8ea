"""NeMo's text-generation API (`PUT /generate`), so clients written for `megatron_gpt_eval.py server=True` work.

The SteerLM tutorials of NeMo and NeMo-Aligner steer with a client that builds the whole prompt itself —
`<extra_id_0>System…<extra_id_2>{attributes}\\n` — sends it as `sentences` to `PUT /generate` and reads
`sentences[0][len(prompt):]`. This route takes that request as NeMo's server does and answers in its shape:
`sentences` (each prompt followed by its continuation), `tokens` (each id's text, the prompt's included),
`token_ids`, `offsets` (where each token starts in its sentence) and `logprob`: with `compute_logprob`, per
sentence the log-probability of each of its `token_ids` after the first, given those before it (the model's
own distribution, untempered, as NeMo's log-softmax of the raw output), else null. NeMo's batch pads a shorter
sentence's list with the log-probabilities of the fill tokens generated after it ended; here each list has
exactly its sentence's entries.

As NeMo's generation does, a continuation ends after the token that completes an end string (which stays in the
sentence) or at a stop token: the template's end of turn is kept (a marker id reads as its text), the
tokenizer's EOS dropped, as NeMo's detokenizer drops it. Sampling as NeMo's: `greedy` takes the argmax
(ignoring `temperature`, `top_k` and `top_p`), else `temperature` (default 1.0), `top_k` (0: off) and `top_p`
(default 0.9). What this server cannot do as NeMo does is refused with a 400 naming the key, never ignored:
`all_probs` (full-vocabulary log-probabilities per position), `repetition_penalty` other than 1,
`min_tokens_to_generate` other than 0, `task_ids` and `neighbors` (p-tuning and RETRO). The raw prompt carries
its own attribute line, so an API key bound to a profile (whose attributes the server must impose) may not use
this route.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from steerlm.config.inference import SEED_LIMIT, ServeConfig
from steerlm.inference.generate import Delta, SamplingParams
from steerlm.inference.http_api import LEAST_LOGPROB, ApiError, check_limit, check_stop_strings
from steerlm.tokenizers import Tokenizer

# NeMo's own cap on sentences per request; this server's `limits.max_n` applies too.
MAX_SENTENCES = 128
# Fields NeMo accepts whose NeMo meaning this server cannot reproduce: refused unless at their no-op value.
REFUSED: dict[str, tuple[object, str]] = {
    "all_probs": (False, "full-vocabulary log-probabilities per position are not served"),
    "repetition_penalty": (1.0, "repetition penalties are not implemented"),
    "min_tokens_to_generate": (0, "a minimum length is not implemented"),
    "task_ids": (None, "p-tuned and prompt-tuned models are not served"),
    "neighbors": (None, "RETRO models are not served"),
}


class NemoGenerateRequest(BaseModel):
    """NeMo's `PUT /generate` body (`text_generation_server.py`), with NeMo's defaults."""

    model_config = ConfigDict(strict=True, extra="forbid")

    sentences: list[str] = Field(min_length=1)
    tokens_to_generate: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    add_BOS: bool = False
    greedy: bool = False
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=0.9, ge=0, le=1)
    end_strings: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])
    random_seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    compute_logprob: bool = False
    all_probs: bool = False
    repetition_penalty: float = 1.0
    min_tokens_to_generate: int = 0
    task_ids: Any = None
    neighbors: Any = None


def nemo_job(
    body: NemoGenerateRequest, cfg: ServeConfig, tokenizer: Tokenizer, max_prompt_tokens: int
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each sentence's prompt ids and sampling settings, or an ApiError naming the field."""
    for key, (noop, reason) in REFUSED.items():
        if getattr(body, key) != noop:
            raise ApiError(400, f"{key}={getattr(body, key)!r}: {reason}", param=key, code="unsupported_parameter")
    limit = min(MAX_SENTENCES, cfg.limits.max_n)
    if len(body.sentences) > limit:
        raise ApiError(
            400,
            f"{len(body.sentences)} sentences exceed this server's limit of {limit} per request (limits.max_n)",
            param="sentences",
            code="too_many_sentences",
        )
    check_limit(
        body.tokens_to_generate,
        cfg.limits.max_tokens,
        "tokens_to_generate",
        "limits.max_tokens",
        "max_tokens_too_large",
    )
    check_stop_strings(body.end_strings, cfg.limits, "end_strings", "end strings")
    bos = [tokenizer.bos_id] if body.add_BOS and tokenizer.bos_id is not None else []
    prompts = [bos + tokenizer.encode(sentence) for sentence in body.sentences]
    for index, prompt in enumerate(prompts):
        if not prompt or len(prompt) > max_prompt_tokens:
            raise ApiError(
                400,
                f"sentences[{index}] has {len(prompt)} tokens; the model takes 1 to {max_prompt_tokens} before "
                "generating",
                param=f"sentences[{index}]",
                code="context_length_exceeded",
            )
    seed = cfg.sampling.seed if body.random_seed is None else body.random_seed
    params = SamplingParams(
        max_new_tokens=body.tokens_to_generate,
        temperature=0.0 if body.greedy else body.temperature,
        top_k=0 if body.greedy else body.top_k,
        top_p=1.0 if body.greedy or body.top_p == 0 else body.top_p,  # NeMo reads top_p 0 as off
        stop=tuple(body.end_strings),
        seed=seed,
        logprobs=body.compute_logprob,
        prompt_logprobs=body.compute_logprob,
    )
    try:
        params.validate()
    except ValueError as error:
        raise ApiError(400, str(error), code="invalid_request") from None
    return prompts, [params] * len(prompts)


def _logprobs(deltas: list[Delta], kept_stop: bool) -> list[float]:
    """A sentence's `logprob`: its prompt's tokens after the first, its generated ones, its kept stop token
    (-inf, which JSON cannot carry, as OpenAI's -9999.0)."""
    items = [item for delta in deltas for item in (*(delta.prompt_logprobs or ()), *delta.logprobs)]
    items += [d.stop_logprob for d in deltas if kept_stop and d.stop_logprob is not None]
    return [max(item.logprob, LEAST_LOGPROB) for item in items]


def nemo_response(
    tokenizer: Tokenizer, body: NemoGenerateRequest, prompts: list[list[int]], rows: list[list[Delta]]
) -> dict:
    """NeMo's answer: per sentence, the prompt as sent followed by the continuation's text in context (decoded
    after the prompt's ids, with the stop token that ended it), each id's text and where it starts, and with
    `compute_logprob` each id's log-probability after the first."""
    out: dict[str, Any] = {"sentences": [], "tokens": [], "token_ids": [], "offsets": []}
    out["logprob"] = [] if body.compute_logprob else None
    for sentence, prompt, deltas in zip(body.sentences, prompts, rows):
        generated = [token for delta in deltas for token in delta.token_ids]
        # a stop token is kept as NeMo keeps an end string; the EOS is dropped as NeMo's detokenizer drops it
        stops = [d.stop_token for d in deltas if d.stop_token is not None and d.stop_token != tokenizer.eos_id]
        generated += stops
        ids = prompt + generated
        if body.compute_logprob:
            scored = _logprobs(deltas, kept_stop=bool(stops))
            if len(scored) != len(ids) - 1:
                raise RuntimeError(f"{len(scored)} log-probabilities for {len(ids)} tokens")
            out["logprob"].append(scored)
        continuation = tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
        tokens = [tokenizer.decode([token]) for token in ids]
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        out["sentences"].append(sentence + continuation)
        out["tokens"].append(tokens)
        out["token_ids"].append(ids)
        out["offsets"].append(offsets)
    return out
