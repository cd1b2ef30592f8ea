"""The regression Attribute Prediction Model: the Llama backbone with a linear head that emits one
value per attribute from every position's final hidden state.

The head lives on the last pipeline stage (where megatron's output layer would be) and is replicated
across tensor-parallel ranks: its input is the full hidden state (gathered from the sequence-parallel
split when that is on), so every TP rank computes the same scores and megatron treats the head like
any other replicated parameter (gradient norm counted once). The vocabulary output layer is kept, so
an APM initialises from a language-model checkpoint and its backbone stays an LM.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from steerlm.config.schema import ModelConfig, PrecisionConfig
from steerlm.megatron_compat import GPTModelWithOwnHead
from steerlm.models.gpt import build_model_chunks
from steerlm.runtime.layout import ParallelLayout

HEAD = "attribute_head"  # the head's module name: its parameters are `attribute_head.weight` / `.bias`


def is_head(name: str) -> bool:
    """Whether a parameter's (global) name is the attribute head's (which no language model has)."""
    return name.startswith(f"{HEAD}.")


class AttributeGPTModel(GPTModelWithOwnHead):
    """GPTModel whose last stage returns attribute scores `[b, s, num_attributes]` instead of logits."""

    def __init__(self, *args, num_attributes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_attributes = num_attributes
        if self.post_process:
            self.attribute_head = torch.nn.Linear(
                self.config.hidden_size, num_attributes, bias=True, dtype=self.config.params_dtype
            )

    def own_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            # The head is replicated, so its gradient is the same on every TP rank: backward keeps
            # this rank's sequence slice instead of summing copies.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )
        return self.attribute_head(hidden_states).transpose(0, 1).contiguous()


def build_attribute_model_chunks(
    model: ModelConfig, precision: PrecisionConfig, layout: ParallelLayout, seed: int, num_attributes: int
) -> list[AttributeGPTModel]:
    return build_model_chunks(
        model, precision, layout, seed, model_class=AttributeGPTModel, num_attributes=num_attributes
    )


def build_checkpoint_model(
    model: ModelConfig, precision: PrecisionConfig, layout: ParallelLayout, seed: int, num_attributes: int | None
) -> list:
    """The model a checkpoint's weights fit: a regression APM's (with its head of `num_attributes`) when that is
    given, else a language model's. What the conversions build before reading or writing weights."""
    if num_attributes is not None:
        return build_attribute_model_chunks(model, precision, layout, seed, num_attributes)
    return build_model_chunks(model, precision, layout, seed)
