"""Small NeMo 1.x `.nemo` archives for tests/test_nemo_import.py, written from a tiny Hugging Face Llama (or
Nemotron: zero-centred LayerNorm with biases, squared-ReLU MLP, RoPE on half of each head; or Qwen2: q/k/v biases)
with NeMo's key names by this module's own mapping (it shares no code with steerlm's reader): the legacy layout
(`model_weights.ckpt` per TP/PP rank) and megatron's torch_dist distributed checkpoint, at TP=2.

A module of its own so that the ranks `tests.multiproc` starts import neither transformers nor pytest.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import torch
import yaml

from steerlm import runtime
from steerlm.config import ParallelConfig
from steerlm.stages.nemo_import import import_nemo

VOCAB, HIDDEN, FFN, HEADS, GROUPS, LAYERS = 300, 64, 176, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
ROWS = 512  # NeMo's padding: 300 rounded up to make_vocab_size_divisible_by (128) x tensor_model_parallel_size (2)
ATTRIBUTES = 9
TP = 2


# The shape both source models share (Hugging Face's names).
_HF_SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": GROUPS,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _randomised(model: torch.nn.Module, norm_centre: float) -> torch.nn.Module:
    """`model` in eval mode with every weight random: matrices around 0, vectors (norm weights and biases) around
    `norm_centre`, so a swapped, dropped or mis-centred norm term shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (norm_centre if param.dim() == 1 else 0.0))
    return model.eval()


def llama(**changes) -> torch.nn.Module:
    """The independent source model, every weight random (norms included, so a swapped norm shows); `changes` to
    its LlamaConfig (e.g. a `rope_scaling`)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_HF_SHAPE, "rms_norm_eps": 1e-5, **changes})
    return _randomised(transformers.LlamaForCausalLM(config), norm_centre=1.0)


def nemotron() -> torch.nn.Module:
    """An independent Nemotron-shaped source (NeMo's `layernorm1p`, squared ReLU, RoPE on half of each head): its
    norm weights are stored centred on zero (scaled by `1 + weight`), so they and the norm biases are random around
    0."""
    import transformers

    torch.manual_seed(0)
    config = transformers.NemotronConfig(
        **_HF_SHAPE,
        head_dim=HEAD_DIM,
        norm_eps=1e-5,
        hidden_act="relu2",
        partial_rotary_factor=0.5,
        attention_bias=False,
        mlp_bias=False,
    )
    return _randomised(transformers.NemotronForCausalLM(config), norm_centre=0.0)


def qwen2() -> torch.nn.Module:
    """An independent Qwen2-shaped source: a Llama with biases on the query, key and value projections (random
    around 1, as its other vectors are)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**_HF_SHAPE, rms_norm_eps=1e-5, use_sliding_window=False)
    return _randomised(transformers.Qwen2ForCausalLM(config), norm_centre=1.0)


def _grouped_qkv(hf: dict, prefix: str, part: str) -> torch.Tensor:
    """NeMo's `linear_qkv.<part>` from HF's q/k/v_proj: rows grouped per query group [its query heads, key, value]."""
    per_group = HEADS // GROUPS
    q = hf[f"{prefix}self_attn.q_proj.{part}"].unflatten(0, (HEADS, HEAD_DIM))
    k = hf[f"{prefix}self_attn.k_proj.{part}"].unflatten(0, (GROUPS, HEAD_DIM))
    v = hf[f"{prefix}self_attn.v_proj.{part}"].unflatten(0, (GROUPS, HEAD_DIM))
    groups = [torch.cat([q[g * per_group : (g + 1) * per_group], k[g : g + 1], v[g : g + 1]]) for g in range(GROUPS)]
    return torch.cat(groups).flatten(0, 1)


def _norm(out: dict, hf: dict, theirs: str, ours: str) -> None:
    """The HF norm `theirs` (weight, and bias where it has one) as NeMo's `ours` + `weight`/`bias` (`ours` ends with
    `.` for a norm module, `layer_norm_` for TE's norm fused into a linear)."""
    for part in ("weight", "bias"):
        if theirs + part in hf:
            out[ours + part] = hf[theirs + part]


def nemo_tensors(source, fused_norms: bool, head: bool) -> dict[str, torch.Tensor]:
    """Full tensors by megatron-core GPTModel name (no `model.` prefix, global layer numbers) of a HF Llama, Nemotron
    or Qwen2 `source`, NeMo's layout: QKV rows (and Qwen2's biases) grouped per query group [its query heads, key,
    value], fc1 = [gate; up] (SwiGLU) or up alone (Nemotron), norm biases where the source has them, vocabulary
    padded."""
    hf = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    padding = torch.randn(ROWS - VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))
    out = {
        "embedding.word_embeddings.weight": torch.cat([hf["model.embed_tokens.weight"], padding]),
        "output_layer.weight": torch.cat([hf["lm_head.weight"], padding]),
    }
    _norm(out, hf, "model.norm.", "decoder.final_layernorm.")
    for layer in range(LAYERS):
        theirs, ours = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        out[ours + "self_attention.linear_qkv.weight"] = _grouped_qkv(hf, theirs, "weight")
        if theirs + "self_attn.q_proj.bias" in hf:  # Qwen2's
            out[ours + "self_attention.linear_qkv.bias"] = _grouped_qkv(hf, theirs, "bias")
        out[ours + "self_attention.linear_proj.weight"] = hf[theirs + "self_attn.o_proj.weight"]
        gate = [hf[theirs + "mlp.gate_proj.weight"]] if theirs + "mlp.gate_proj.weight" in hf else []
        out[ours + "mlp.linear_fc1.weight"] = torch.cat([*gate, hf[theirs + "mlp.up_proj.weight"]])
        out[ours + "mlp.linear_fc2.weight"] = hf[theirs + "mlp.down_proj.weight"]
        if fused_norms:  # Transformer Engine's spec (NeMo's default)
            attention_norm, mlp_norm = "self_attention.linear_qkv.layer_norm_", "mlp.linear_fc1.layer_norm_"
        else:
            attention_norm, mlp_norm = "input_layernorm.", "pre_mlp_layernorm."
        _norm(out, hf, theirs + "input_layernorm.", ours + attention_norm)
        _norm(out, hf, theirs + "post_attention_layernorm.", ours + mlp_norm)
    if head:
        generator = torch.Generator().manual_seed(2)
        out["rm_head.weight"] = torch.randn(ATTRIBUTES, HIDDEN, generator=generator) * 0.1
        out["rm_head.bias"] = torch.randn(ATTRIBUTES, generator=generator)
    return out


# This file's own record of megatron's tensor-parallel splits (dim; "gated": [gate_r; up_r] for a gated MLP's fc1,
# a plain split along dim 0 for a non-gated one).
_SPLITS = {
    "word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_proj.weight": 1,
    "linear_fc1.weight": "gated",
    "linear_fc2.weight": 1,
    "rm_head.weight": 1,
    # NeMo's ParallelLinearAdapter: linear_in column-parallel beside a column-parallel layer (its rows, the rank dim,
    # split), row-parallel beside a row-parallel one (its input split); linear_out always column-parallel
    "lora_kqv_adapter.linear_in.weight": 0,
    "lora_kqv_adapter.linear_out.weight": 0,
    "lora_dense_attention_adapter.linear_in.weight": 1,
    "lora_dense_attention_adapter.linear_out.weight": 0,
    "lora_hto4h_adapter.linear_in.weight": 0,
    "lora_hto4h_adapter.linear_out.weight": "gated",
    "lora_4htoh_adapter.linear_in.weight": 1,
    "lora_4htoh_adapter.linear_out.weight": 0,
}
LORA_RANK, LORA_ALPHA = 4, 8.0
# NeMo's adapter of each linear (its module path under the layer, and NeMo's target_modules name)
NEMO_ADAPTERS = {
    "linear_qkv": ("self_attention", "lora_kqv_adapter", "attention_qkv"),
    "linear_proj": ("self_attention", "lora_dense_attention_adapter", "attention_dense"),
    "linear_fc1": ("mlp", "lora_hto4h_adapter", "mlp_fc1"),
    "linear_fc2": ("mlp", "lora_4htoh_adapter", "mlp_fc2"),
}


def lora_tensors(full: dict, linears: list[str], seed: int = 3) -> dict[str, torch.Tensor]:
    """NeMo LoRA adapters for `linears` of every layer, full tensors by NeMo name (no `model.` prefix): linear_in
    [rank, in], linear_out [out, rank] (fc1's rows [gate; up] as its weight's), random."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        for linear in linears:
            group, adapter, _ = NEMO_ADAPTERS[linear]
            rows, columns = full[f"decoder.layers.{layer}.{group}.{linear}.weight"].shape
            prefix = f"decoder.layers.{layer}.{group}.adapter_layer.{adapter}"
            out[f"{prefix}.linear_in.weight"] = torch.randn(LORA_RANK, columns, generator=generator) * 0.1
            out[f"{prefix}.linear_out.weight"] = torch.randn(rows, LORA_RANK, generator=generator) * 0.1
    return out


def nemo_lora_config(linears: list[str], **tuning) -> dict:
    """A PEFT archive's model_config.yaml: the model's, plus NeMo's `peft` section."""
    lora_tuning = {
        "adapter_dim": LORA_RANK,
        "alpha": LORA_ALPHA,
        "adapter_dropout": 0.0,
        "target_modules": [NEMO_ADAPTERS[linear][2] for linear in linears],
        **tuning,
    }
    return {**nemo_config(), "peft": {"peft_scheme": "lora", "lora_tuning": lora_tuning}}


def _gated(config: dict) -> bool:
    """Whether NeMo's `activation` is a gated linear unit (fc1 holds [gate; up]): Llama's SwiGLU, not Nemotron's
    squared ReLU."""
    return str(config["activation"]).endswith("glu")


def _split(name: str, gated: bool):
    split = next((split for suffix, split in _SPLITS.items() if name.endswith(suffix)), None)
    return 0 if split == "gated" and not gated else split


def _tp_slice(name: str, full: torch.Tensor, rank: int, gated: bool) -> torch.Tensor:
    split = _split(name, gated)
    if split is None:
        return full
    if split == "gated":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(TP)[rank], up.chunk(TP)[rank]])
    return full.chunk(TP, dim=split)[rank].clone()


def nemo_config(head: bool = False, **changes) -> dict:
    config = {
        "mcore_gpt": True,
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN,
        "num_attention_heads": HEADS,
        "num_query_groups": GROUPS,
        "encoder_seq_length": 128,
        "max_position_embeddings": 128,
        "normalization": "rmsnorm",
        "layernorm_epsilon": 1e-5,
        "activation": "fast-swiglu",
        "bias": False,
        "position_embedding_type": "rope",
        "rotary_base": 10000,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": TP,
        "pipeline_model_parallel_size": 1,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "precision": 32,
        "tokenizer": {"library": "sentencepiece", "model": "nemo:0123abcd_tokenizer.model", "type": None},
    }
    if head:
        config.update(
            reward_model_type="regression",
            regression={"num_attributes": ATTRIBUTES, "merge_attributes": False, "attribute_weights": None},
            target="nemo_aligner.models.nlp.gpt.megatron_gpt_regression_reward_model.MegatronGPTRegressionRewardModel",
        )
    return {**config, **changes}


def nemotron_config(**changes) -> dict:
    """A Nemotron's model_config.yaml (NeMo's keys for `nemotron()`): zero-centred LayerNorm, squared ReLU, RoPE on
    half of each head, no linear biases."""
    nemotron = {"normalization": "layernorm1p", "activation": "squared-relu", "rotary_percentage": 0.5, "bias": False}
    return nemo_config(**{**nemotron, **changes})


def qwen2_config(**changes) -> dict:
    """A Qwen2's model_config.yaml (NeMo's keys for `qwen2()`): a Llama's, with biases on q/k/v alone."""
    return nemo_config(**{"qkv_bias": True, "bias": False, **changes})


def sentencepiece_model() -> bytes:
    import sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog hello world model answer".split()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)),
        model_writer=model,
        vocab_size=40,
        model_type="bpe",
        minloglevel=2,
    )
    return model.getvalue()


def _write_common(directory: Path, config: dict) -> None:
    directory.mkdir(parents=True)
    (directory / "model_config.yaml").write_text(yaml.safe_dump(config))
    (directory / "0123abcd_tokenizer.model").write_bytes(sentencepiece_model())


def write_legacy(directory: Path, full: dict, config: dict, pipeline: int) -> Path:
    """NeMo's legacy layout: one `model_weights.ckpt` per (tp, pp) rank, stage-local layer numbers, TE's
    `_extra_state` entries beside the weights."""
    _write_common(directory, {**config, "pipeline_model_parallel_size": pipeline})
    per_stage = LAYERS // pipeline
    for tp in range(TP):
        for pp in range(pipeline):
            state: dict = {}
            for name, tensor in full.items():
                parts = name.split(".")
                if parts[0] == "decoder" and parts[1] == "layers":
                    layer = int(parts[2])
                    if layer // per_stage != pp:
                        continue
                    name = ".".join(["decoder", "layers", str(layer % per_stage), *parts[3:]])
                    if name.endswith("linear_qkv.weight"):
                        state["model." + name.replace(".weight", "._extra_state")] = io.BytesIO(b"fp8 metadata")
                elif (pp != 0) if name.startswith("embedding.") else (pp != pipeline - 1):
                    continue
                state["model." + name] = _tp_slice(name, tensor, tp, _gated(config))
            rank_dir = f"mp_rank_{tp:02d}" if pipeline == 1 else f"tp_rank_{tp:02d}_pp_rank_{pp:03d}"
            (directory / rank_dir).mkdir()
            torch.save(state, directory / rank_dir / "model_weights.ckpt")
    return directory


def write_distributed(directory: Path, full: dict, config: dict) -> Path:
    """NeMo's distributed layout, as megatron's dist_checkpointing saves a TP=2 model: every TP slice a shard of
    the global tensor, decoder layers stacked along a leading axis (needs the one-rank `layout` fixture)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from steerlm.megatron_compat import use_in_process_save_queue

    _write_common(directory, config)
    gated = _gated(config)
    shards: list = []
    for name, tensor in full.items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            key, layer = "model.decoder.layers." + ".".join(parts[3:]), int(parts[2])
            stacked: tuple = ((0, layer, LAYERS),)
        else:
            key, stacked = "model." + name, ()
        axis = len(stacked)
        split = _split(name, gated)
        for rank in range(TP if split is not None else 1):
            piece = _tp_slice(name, tensor, rank, gated)
            if split is None:
                offsets: list = []
            elif split == "gated":
                gate, up = piece.chunk(2)
                for part, index in ((gate, rank), (up, TP + rank)):
                    shards.append(
                        ShardedTensor.from_rank_offsets(
                            key, part.clone(), *stacked, (axis, index, 2 * TP), replica_id=0, prepend_axis_num=axis
                        )
                    )
                continue
            else:
                offsets = [(axis + split, rank, TP)]
            shards.append(
                ShardedTensor.from_rank_offsets(key, piece, *stacked, *offsets, replica_id=0, prepend_axis_num=axis)
            )
    shards.append(ShardedObject("model.decoder.layers.self_attention.linear_qkv._extra_state", b"fp8", (1,), (0,)))
    (directory / "model_weights").mkdir()
    use_in_process_save_queue()
    dist_checkpointing.save({"shards": shards}, str(directory / "model_weights"))
    return directory


def to_tar(directory: Path) -> Path:
    """The `.nemo` file NeMo's save_to writes: an uncompressed tar of the directory, members named `./…`."""
    path = directory.with_suffix(".nemo")
    with tarfile.open(path, "w:") as tar:
        tar.add(directory, arcname=".")
    return path


def import_at(archive: str, output_dir: str, parallel: ParallelConfig) -> None:
    layout = runtime.initialize(parallel, seed=0)
    try:
        import_nemo(archive, output_dir, layout)
    finally:
        runtime.shutdown()
