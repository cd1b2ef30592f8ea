"""14. Input embeddings multiplied by a constant (Gemma's sqrt(hidden_size); NeMo's `apply_embedding_scaling`), which
megatron-core 0.16's GPTModel lacks.

`scale_embeddings` registers a forward hook on a GPTModel chunk's `embedding` (megatron's `LanguageModelEmbedding`,
the first pipeline stage's alone): its output — the `[positions, rows, hidden]` word embeddings after megatron's
transpose, sequence-parallel scatter and dropout, all of them linear in it — is multiplied by the scale in the output's
dtype, as transformers' `GemmaScaledWordEmbedding` multiplies by `embed_scale.to(weight.dtype)`. Code that looks the
words up itself (the lean decoder) scales them with `scaled_lookup`, the same product.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

_SCALE = "steerlm_embedding_scale"  # the attribute of a chunk's `embedding` that `scale_embeddings` sets


def scale_embeddings(gpt: GPTModel, scale: float) -> None:
    """Multiply what a GPTModel chunk's embedding returns by `scale` (nothing on a chunk without the embedding)."""
    embedding = getattr(gpt, "embedding", None)
    if embedding is None:
        return
    if not isinstance(embedding, torch.nn.Module) or not hasattr(embedding, "word_embeddings"):
        raise RuntimeError(
            "GPTModel.embedding is not megatron's LanguageModelEmbedding: this megatron-core changed the input "
            "embedding; update steerlm.megatron_compat.scaled_embedding"
        )
    setattr(embedding, _SCALE, scale)
    embedding.register_forward_hook(lambda module, inputs, output: _times(output, scale))


def embedding_scale(gpt: GPTModel) -> float | None:
    """The scale `scale_embeddings` gave this chunk's embedding; None for none (or no embedding)."""
    return getattr(getattr(gpt, "embedding", None), _SCALE, None)


def scaled_lookup(gpt: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """The word embeddings of `tokens` (`[rows, n]` → `[rows, n, hidden]`, TP-reduced) as the chunk's embedding
    scales them."""
    words = gpt.embedding.word_embeddings(tokens)
    scale = embedding_scale(gpt)
    return words if scale is None else _times(words, scale)


def _times(embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """`embeddings` times `scale` rounded to their dtype (transformers' and NeMo's product)."""
    return embeddings * torch.tensor(scale, dtype=embeddings.dtype, device=embeddings.device)
