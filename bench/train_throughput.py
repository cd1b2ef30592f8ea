"""Training throughput, side by side: steerlm (megatron-core GPTModel, local layers + SDPA attention,
megatron DDP/optimizer with fp32 master weights) vs HF transformers LlamaForCausalLM (SDPA attention,
fp32 weights under bf16 autocast, fused AdamW) on the same Llama shape, one device, one process.

    python bench/train_throughput.py --preset llama3_2_1b --seq-length 4096 --steps 10      # GPU
    python bench/train_throughput.py --preset tiny --seq-length 256 --dtype fp32 --steps 5   # CPU smoke

Prints tokens/s and model TFLOP/s of each and the steerlm / HF ratio.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from steerlm import runtime
from steerlm.config import DType, ParallelConfig, PrecisionConfig, TrainerConfig, compose, to_typed
from steerlm.config.schema import ModelConfig
from steerlm.models import build_model_chunks
from steerlm.models.hf_llama import hf_config_dict
from steerlm.training import build_optimizer, microbatches_for_rank, train_step, wrap_for_training


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters incl. the output layer) + causal attention."""
    matmul_params = (
        model.num_parameters()
        - model.vocab_size * model.hidden_size * (1 if model.share_embeddings_and_output_weights else 2)
        + model.vocab_size * model.hidden_size
    )
    attention = 6 * model.num_layers * model.num_attention_heads * model.head_dim * seq_length
    return 6.0 * matmul_params + attention


def _batch(model: ModelConfig, rows: int, seq_length: int) -> dict[str, torch.Tensor]:
    stream = torch.randint(0, model.vocab_size, (rows, seq_length + 1), generator=torch.Generator().manual_seed(0))
    return {
        "tokens": stream[:, :-1],
        "labels": stream[:, 1:],
        "loss_mask": torch.ones(rows, seq_length),
        "position_ids": torch.arange(seq_length).expand(rows, seq_length),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_hf(
    model: ModelConfig, dtype: DType, rows: int, seq_length: int, warmup: int, steps: int, device: torch.device
) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in hf_config_dict(model).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = _batch(model, rows, seq_length)
    tokens = batch["tokens"].to(device)
    autocast_dtype = {DType.bf16: torch.bfloat16, DType.fp16: torch.float16}.get(dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time(step, device, warmup, steps)  # the model and optimizer are freed with this frame


def bench_steerlm(model: ModelConfig, dtype: DType, rows: int, seq_length: int, warmup: int, steps: int) -> float:
    layout = runtime.initialize(ParallelConfig(), seed=1)
    precision = PrecisionConfig(dtype=dtype)
    trainer = TrainerConfig(
        micro_batch_size=rows, global_batch_size=rows, seq_length=seq_length, max_steps=warmup + steps
    )
    cfg = to_typed(compose("demo", ["optim.lr=1e-5", "optim.min_lr=1e-6", "optim.lr_warmup_steps=0"]))
    chunks = build_model_chunks(model, precision, layout, seed=1)
    wrapped = wrap_for_training(chunks, precision, False, layout)
    optimizer, scheduler = build_optimizer(wrapped, cfg.optim, precision, trainer, False, layout)
    microbatches = microbatches_for_rank(_batch(model, rows, seq_length), rows, layout)
    seconds = _time(
        lambda: train_step(wrapped, optimizer, scheduler, microbatches, layout), layout.device, warmup, steps
    )
    runtime.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    model = to_typed(compose("demo", [f"model={args.preset}"])).model
    dtype = DType(args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.micro_batch_size * args.seq_length
    per_token = flops_per_token(model, args.seq_length)
    results = {"hf": bench_hf(model, dtype, args.micro_batch_size, args.seq_length, args.warmup, args.steps, device)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["steerlm"] = bench_steerlm(model, dtype, args.micro_batch_size, args.seq_length, args.warmup, args.steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{args.preset} ({model.num_parameters() / 1e9:.3f}B) {args.dtype} seq {args.seq_length} "
        f"x micro batch {args.micro_batch_size} on {name}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    for key, seconds in results.items():
        print(
            f"  {key:8s} {seconds * 1e3:9.1f} ms/step {tokens / seconds:10.0f} tokens/s "
            f"{per_token * tokens / seconds / 1e12:8.1f} TFLOP/s"
        )
    print(f"  ratio steerlm / hf (throughput): {results['hf'] / results['steerlm']:.3f}")


if __name__ == "__main__":
    main()
