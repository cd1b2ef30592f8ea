"""megatron-core Llama-family models: builder, SDPA attention, layout-independent init, sharding maps."""

from steerlm.models.gpt import build_model_chunks, torch_dtype, transformer_config

__all__ = ["build_model_chunks", "torch_dtype", "transformer_config"]
