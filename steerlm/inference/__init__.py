"""Steering at inference: KV-cache generation under TP, attribute-conditioned prompts, chat and an
OpenAI-compatible server (with an APM scoring endpoint)."""

from steerlm.inference.generate import (
    Completion,
    Delta,
    FinishReason,
    Generator,
    PromptTooLong,
    SamplingParams,
    TokenLogprob,
)

__all__ = ["Completion", "Delta", "FinishReason", "Generator", "PromptTooLong", "SamplingParams", "TokenLogprob"]
