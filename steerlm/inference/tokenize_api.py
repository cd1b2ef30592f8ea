"""vLLM's tokenizer routes, so a client tokenizes with the served model's own tokenizer and template.

    POST /tokenize        {"prompt": text, "add_special_tokens": true}: the ids `/v1/completions` gives a string
                          prompt (the BOS first unless `add_special_tokens` is false);
                          {"model", "messages", "attributes", "profile"}: the ids `/v1/chat/completions` builds
                          for those messages — the prompt, attribute line included, the model is asked with
    POST /detokenize      {"tokens": [ids]}: their text
    GET  /tokenizer_info  the special tokens' text, the tokenizer's kind and the longest sequence

lm-evaluation-harness's `local-completions` model looks for `/tokenizer_info` and `/tokenize` and, where they
answer, tokenizes through them (its "remote" tokenizer backend): its requests then carry the server's ids with
no tokenizer installed beside it. The answers have vLLM's fields (`count`, `max_model_len`, `tokens`;
`prompt`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from steerlm.inference.chat_api import MessageIn
from steerlm.inference.http_api import ApiError, check_vocabulary
from steerlm.tokenizers import Tokenizer


class TokenizeRequest(BaseModel):
    """One of `prompt` (text) or `messages` (a chat, with the chat route's `model`, `attributes`, `profile`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[MessageIn] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    attributes: dict[str, Any] | str | None = None
    profile: str | None = None

    def form(self) -> str:
        """`prompt` or `messages`, or an ApiError naming what is wrong with the pair or with their options."""
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send exactly one of prompt (text) or messages (a chat)", param="prompt")
        if self.prompt is not None:
            chat_only = (
                ("attributes", self.attributes),
                ("profile", self.profile),
                ("add_generation_prompt", self.add_generation_prompt),
            )
            for key, value in chat_only:
                if value is not None:
                    raise ApiError(400, f"{key} applies to messages, not to a prompt", param=key)
            return "prompt"
        if self.add_special_tokens:
            raise ApiError(
                400,
                "add_special_tokens does not apply to messages: the chat template places the BOS as in training",
                param="add_special_tokens",
            )
        if self.add_generation_prompt is False:
            raise ApiError(
                400,
                "add_generation_prompt=false is not supported: messages tokenize as the prompt that asks for the "
                "next assistant turn",
                param="add_generation_prompt",
            )
        if self.model is None:
            raise ApiError(400, "messages need the model (or <model>:<profile>) they are asked of", param="model")
        return "messages"


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    tokens: list[int]


def tokenized(ids: list[int], max_model_len: int) -> dict:
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}


def detokenized(tokenizer: Tokenizer, body: DetokenizeRequest) -> dict:
    check_vocabulary(body.tokens, tokenizer.vocab_size, "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    """The special tokens as text (null where the tokenizer has none), as vLLM's `/tokenizer_info` gives them."""

    def text(token: int | None) -> str | None:
        return None if token is None else tokenizer.decode([token])

    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": text(tokenizer.bos_id),
        "eos_token": text(tokenizer.eos_id),
        "pad_token": text(tokenizer.pad_id),
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }
