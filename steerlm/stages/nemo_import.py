"""Import a NeMo 1.x `.nemo` model (NeMo-Aligner's SteerLM models and regression reward models) as a steerlm
checkpoint: `import_nemo(archive, output_dir, layout)`.

The output is a run directory like training writes (`checkpoints/latest` → `step_0000000/`, with the resolved
config), plus the archive's tokenizer under `tokenizer/`: serve it with `checkpoint=<output_dir>`, score with it
as `apm_checkpoint=` (a reward model), or start training from it with `sft.init_from` / `apm.init_from`. It holds
weights only (no optimizer state), so it is a starting point, not a run to resume. A reward model's `rm_head`
becomes the regression APM's attribute head, in the head's own output order.

`import_nemo_lora(adapters, base, output_dir, layout)` imports a NeMo LoRA archive (NeMo's PEFT training writes the
adapters alone) as a steerlm LoRA checkpoint of the adapters alone, its base the `.nemo` model they adapt (named and
fingerprinted, as a steerlm LoRA run's adapters-only checkpoint names its `init_from`): whatever reads it merges
them into the base (serving, `to=hf`, `to=steerlm`), `to=peft` exports them for vLLM or PEFT, and `sft.init_from`
starts from the merged model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from steerlm import runtime
from steerlm.checkpoint.sharded import WeightsOnly, checkpoint_root, save_checkpoint
from steerlm.checkpoint.sources import BaseWeights, WeightFormat
from steerlm.config import AttributeModelConfig, AttributesConfig, ParallelConfig, PrecisionConfig
from steerlm.config.lora import LoraConfig
from steerlm.config.schema import (
    APMConfig,
    DType,
    TemplateOptions,
    TokenizerConfig,
    TokenizerType,
    TrainDataConfig,
    TrainerConfig,
)
from steerlm.config.sft import SFTConfig
from steerlm.config.validation import validate_model_layout
from steerlm.errors import ConfigError, DataError
from steerlm.inference.nemo_source import nemo_attributes, nemo_tokenization, write_tokenizer
from steerlm.models import lora
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.models.gpt import build_model_chunks
from steerlm.models.nemo_archive import tokenizer_member
from steerlm.models.nemo_lora import NemoAdapters
from steerlm.models.nemo_weights import NemoCheckpoint
from steerlm.models.sharding import load_full_parameters
from steerlm.runtime.layout import ParallelLayout

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"
_DTYPES = {torch.float32: DType.fp32, torch.bfloat16: DType.bf16, torch.float16: DType.fp16}


def import_nemo(
    archive: str | Path,
    output_dir: str | Path,
    layout: ParallelLayout,
    attributes: AttributesConfig | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: DType | None = None,
) -> Path:
    """Collective (after `runtime.initialize`): write `archive`'s model as a steerlm checkpoint; returns its path.

    Every rank reads only the tensors of its own shards, so any source TP/PP imports at any `layout`.
    `attributes`: the schema the model was trained with (default: NeMo-Aligner's nine SteerLM attributes, the
    `steerlm_oasst` schema; a reward head's output count must match it). `tokenizer_path`: a tokenizer directory
    to use instead of the archive's (needed when the archive names a Hugging Face Hub tokenizer). `dtype`: the
    checkpoint's weights (default: the archive's).
    """
    output_dir = _new_output(output_dir)
    with NemoCheckpoint(archive) as source:
        model, head = source.model, source.nemo.reward_head
        parallel = ParallelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
        validate_model_layout(model, parallel, runtime.detect_accelerator())
        schema = nemo_attributes(str(archive), head, attributes, source.config)
        precision = PrecisionConfig(dtype=dtype or _DTYPES.get(source.weights_dtype, DType.fp32))
        if tokenizer_path is None:
            tokenizer_member(source.archive, source.config)  # every rank refuses a missing tokenizer before saving
        if layout.is_rank_zero:
            write_tokenizer(source, output_dir / TOKENIZER_DIR, tokenizer_path)
        if head is None:
            chunks = build_model_chunks(model, precision, layout, seed=0)
        else:
            chunks = build_attribute_model_chunks(model, precision, layout, 0, head.num_attributes)
        source.load_into(chunks, layout.tp_rank, layout.tp)
        cfg = _imported_config(archive, output_dir, source, parallel, precision, schema)
        path = save_checkpoint(output_dir, 0, WeightsOnly(chunks), layout, cfg)
    if layout.is_rank_zero:
        log.info("imported %s (%s) into %s", archive, "reward model" if head else "language model", path)
    return path


def import_nemo_lora(
    adapters: str | Path,
    base: str | Path,
    output_dir: str | Path,
    layout: ParallelLayout,
    attributes: AttributesConfig | None = None,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Collective (after `runtime.initialize`): write the LoRA adapters of NeMo PEFT archive `adapters` as a steerlm
    checkpoint of the adapters alone on `base` (the `.nemo` language model they were trained on); returns its path.
    `attributes` and `tokenizer_path` as for `import_nemo`; the weights keep the base's dtype."""
    output_dir = _new_output(output_dir)
    with NemoCheckpoint(base) as source:
        model = source.model
        if source.nemo.reward_head is not None:
            raise ConfigError(
                "base", str(base), "is a reward model", "import LoRA adapters of a language model (SteerLM's SFT)"
            )
        parallel = ParallelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
        validate_model_layout(model, parallel, runtime.detect_accelerator())
        precision = PrecisionConfig(dtype=_DTYPES.get(source.weights_dtype, DType.fp32))
        if tokenizer_path is None:
            tokenizer_member(source.archive, source.config)
        if layout.is_rank_zero:
            write_tokenizer(source, output_dir / TOKENIZER_DIR, tokenizer_path)
        chunks = build_model_chunks(model, precision, layout, seed=0)  # the base weights stay unread: never saved
        with NemoAdapters(adapters, model.num_layers) as nemo_lora:
            lora.attach(chunks, nemo_lora.lora, seed=0)
            names = nemo_lora.names(model.num_layers)
            full = nemo_lora.full_tensors(names, gated=model.gated_mlp)
            try:
                load_full_parameters(chunks, full, layout.tp_rank, layout.tp, keep=lambda name: name not in full)
            except ValueError as error:  # a shape that is not the base's
                raise DataError(
                    str(adapters),
                    None,
                    None,
                    f"does not fit {base}: {error}",
                    "pass the base the adapters were trained on",
                ) from None
            cfg = _imported_config(
                base,
                output_dir,
                source,
                parallel,
                precision,
                nemo_attributes(str(adapters), None, attributes, source.config),
                nemo_lora.lora,
            )
        weights = WeightsOnly(chunks, base=BaseWeights.of(WeightFormat.nemo, Path(base)))
        path = save_checkpoint(output_dir, 0, weights, layout, cfg)
    if layout.is_rank_zero:
        log.info("imported the LoRA adapters of %s on %s into %s", adapters, base, path)
    return path


def _new_output(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    if checkpoint_root(output_dir).exists():
        raise ConfigError(
            "output_dir", str(output_dir), "already holds checkpoints", "import into a new directory, or delete it"
        )
    return output_dir


def _imported_config(
    archive: str | Path,
    output_dir: Path,
    source: NemoCheckpoint,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    schema: AttributesConfig,
    adapters: LoraConfig | None = None,
) -> SFTConfig | AttributeModelConfig:
    """The resolved config saved with the checkpoint: an SFT run's for a language model, an APM run's (with
    NeMo-Aligner's merge weights) for a reward model, tokenised as NeMo does (`template.tokenization=nemo`) unless a
    steerlm export recorded its source's tokenization. NeMo records no training data, so `data.train_file` names the
    archive the weights came from."""
    model, head = source.model, source.nemo.reward_head
    common: dict[str, Any] = {
        "model": model,
        "parallel": parallel,
        "precision": precision,
        "trainer": TrainerConfig(seq_length=model.max_position_embeddings),
        "attributes": schema,
        "tokenizer": TokenizerConfig(type=TokenizerType.hf, path=str((output_dir / TOKENIZER_DIR).resolve())),
        "data": TrainDataConfig(train_file=str(Path(archive).resolve())),
        "output_dir": str(output_dir),
        # NeMo's ids (what NeMo-Aligner trained it on), or those of the steerlm run an exported archive came from
        "template": TemplateOptions(tokenization=nemo_tokenization(source.config)),
    }
    if adapters is not None:
        common["lora"] = adapters
    if head is None:
        return SFTConfig(**common)
    return AttributeModelConfig(**common, apm=APMConfig(merge_weights=head.merge_weights))
