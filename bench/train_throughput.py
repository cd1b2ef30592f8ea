"""Training throughput, side by side: steerlm (megatron-core GPTModel, local layers + SDPA attention, the chunked
cross entropy, `trainer.torch_compile` as configured, megatron DDP/optimizer with fp32 master weights) vs HF
transformers LlamaForCausalLM (SDPA attention, fp32 weights under bf16 autocast, torch's fused AdamW as HF
Trainer's default `adamw_torch_fused` runs it, eager) on the same Llama shape, one device, one process.

    python bench/train_throughput.py --preset llama3_2_1b --seq-length 4096 --steps 10        # GPU
    python bench/train_throughput.py --preset small --seq-length 256 --micro-batch-size 2 --dtype fp32 \\
        --warmup 1 --steps 2 --rounds 3                                                          # CPU
    python bench/train_throughput.py ... --prompt-fraction 0.5                                   # SFT-shaped
    python bench/train_throughput.py ... --lora-rank 16                                          # LoRA
    python bench/train_throughput.py ... --recompute uniform                                     # recomputation

`--lora-rank R` trains low-rank adapters on every linear layer of a frozen model on both sides (steerlm's
`lora.rank=R`, HF with PEFT's LoraConfig on q/k/v/o/gate/up/down_proj, alpha 2R, the optimizer over the adapters
only) and adds a third side, `full`: steerlm training every weight, so the LoRA step's cost is measured against
full fine-tuning in the same run.

`--recompute uniform|block` adds a side `recomputed`: steerlm with `model.recompute` (every layer, or the first
`model.recompute_num_layers`, computed again in the backward instead of keeping its activations), so what the
recomputation costs in time (and saves in peak memory, on GPU) is measured against steerlm's step in the same run.

`--prompt-fraction F` makes it an SFT step: the first F of every row's positions are prompt, trained by neither
side (steerlm's `loss_mask` 0, which its chunked loss skips; HF's labels -100, as TRL's completion-only loss
gives them, after HF computes logits for every position). TFLOP/s counts the whole step's model FLOPs for both.

On GPU each side is built, timed (mean step after warm-up) and freed in turn, so its peak memory is its own. On
CPU, where other processes share the cores, both are built and timed in alternating rounds of `--steps` steps,
and each side's median step is reported, so both see the same load. Prints ms/step, tokens/s, model TFLOP/s,
peak memory (GPU) and the steerlm / HF throughput ratio; `--json` also writes them to a file. Where
CPU, another side is steerlm on the product library `parallel.cpu_matmul=auto` did not pick (`blas` where it picked
oneDNN, on AMD CPUs; `onednn` where it kept torch's BLAS, e.g. MKL on Intel CPUs): the ratio of the two is what the
choice is worth on this CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from steerlm import megatron_compat, runtime
from steerlm.config import ConfigError, DType, ParallelConfig, PrecisionConfig, TrainerConfig, compose, to_typed
from steerlm.config.lora import LoraConfig
from steerlm.config.schema import CpuMatmul, ModelConfig, Recompute
from steerlm.models import build_model_chunks, lora
from steerlm.models.hf_llama import hf_config_dict, lora_projections
from steerlm.runtime import ParallelLayout
from steerlm.runtime.cpu_matmul import matmul, routable, use_onednn
from steerlm.training import build_optimizer, microbatches_for_rank, train_step, wrap_for_training
from steerlm.training.setup import compile_layers

Step = Callable[[], None]


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters incl. the output layer) + causal attention."""
    matmul_params = (
        model.num_parameters()
        - model.vocab_size * model.hidden_size * (1 if model.share_embeddings_and_output_weights else 2)
        + model.vocab_size * model.hidden_size
    )
    attention = 6 * model.num_layers * model.num_attention_heads * model.head_dim * seq_length
    return 6.0 * matmul_params + attention


def _batch(model: ModelConfig, rows: int, seq_length: int, prompt: int) -> dict[str, torch.Tensor]:
    """Random tokens; the first `prompt` positions of each row are not trained."""
    stream = torch.randint(0, model.vocab_size, (rows, seq_length + 1), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones(rows, seq_length)
    loss_mask[:, :prompt] = 0
    return {
        "tokens": stream[:, :-1],
        "labels": stream[:, 1:],
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq_length).expand(rows, seq_length),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_step(
    model: ModelConfig,
    dtype: DType,
    rows: int,
    seq_length: int,
    prompt: int,
    device: torch.device,
    adapters: LoraConfig | None = None,
) -> Step:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in hf_config_dict(model).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).to(device).train()
    if adapters is not None:
        import peft

        projections = sorted({p for target in adapters.targets for p in lora_projections(model)[target][1]})
        settings = peft.LoraConfig(r=adapters.rank, lora_alpha=adapters.alpha, target_modules=projections)
        hf = peft.get_peft_model(hf, settings).train()
    trained = [param for param in hf.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)
    tokens = _batch(model, rows, seq_length, prompt)["tokens"].to(device)
    labels = tokens.clone()
    labels[:, : prompt + 1] = -100  # HF shifts labels: position i predicts label i + 1, as steerlm's position i
    autocast_dtype = {DType.bf16: torch.bfloat16, DType.fp16: torch.float16}.get(dtype)

    def step() -> None:
        # without steerlm's CPU stand-ins for megatron, which `runtime.initialize` installs for the process
        with megatron_compat.lifted():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = hf(input_ids=tokens, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def steerlm_step(
    model: ModelConfig,
    dtype: DType,
    rows: int,
    seq_length: int,
    prompt: int,
    compile_model: bool,
    layout: ParallelLayout,
    cpu_products: CpuMatmul = CpuMatmul.auto,
    adapters: LoraConfig | None = None,
) -> Step:
    # the route is per process: each step installs its own, so sides with different ones alternate fairly
    route = (routable, matmul) if layout.device.type == "cpu" and use_onednn(cpu_products) else None
    precision = PrecisionConfig(dtype=dtype)
    trainer = TrainerConfig(micro_batch_size=rows, global_batch_size=rows, seq_length=seq_length, max_steps=10**6)
    cfg = to_typed(compose("demo", ["optim.lr=1e-5", "optim.min_lr=1e-6", "optim.lr_warmup_steps=0"]))
    chunks = build_model_chunks(model, precision, layout, seed=1)
    if adapters is not None:
        lora.attach(chunks, adapters, seed=1)
        lora.freeze_base(chunks)
    if compile_model:
        compile_layers(chunks)
    wrapped = wrap_for_training(chunks, precision, False, layout)
    optimizer, scheduler = build_optimizer(wrapped, cfg.optim, precision, trainer, False, layout)
    microbatches = microbatches_for_rank(_batch(model, rows, seq_length, prompt), rows, layout)

    def step() -> None:
        megatron_compat.route_matmuls(route)
        train_step(wrapped, optimizer, scheduler, microbatches, layout)

    return step


def _timed(step: Step, device: torch.device, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_in_turn(builders: dict[str, Callable[[], Step]], device: torch.device, warmup: int, steps: int) -> dict:
    """GPU: each side alone (built, warmed up, timed, freed): mean step and peak memory."""
    results = {}
    for name, build in builders.items():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = build()
        _timed(step, device, warmup)
        results[name] = {"seconds": statistics.mean(_timed(step, device, steps))}
        results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del step
    return results


def measure_alternating(
    builders: dict[str, Callable[[], Step]], device: torch.device, warmup: int, steps: int, rounds: int
) -> dict:
    """CPU: both sides built, then alternating rounds of `steps` steps; the median step of each."""
    prepared = {name: build() for name, build in builders.items()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for step in prepared.values():
        _timed(step, device, warmup)
    for _ in range(rounds):
        for name, step in prepared.items():
            times[name] += _timed(step, device, steps)
    return {name: {"seconds": statistics.median(seconds)} for name, seconds in times.items()}


def _other_cpu_products(device: torch.device) -> CpuMatmul | None:
    """On CPU, the product library `parallel.cpu_matmul=auto` did not pick (BLAS where it picked oneDNN, oneDNN
    where it kept BLAS), so the benchmark shows what the choice is worth on this CPU; None on GPU or where oneDNN
    cannot run."""
    if device.type != "cpu":
        return None
    if use_onednn(CpuMatmul.auto):
        return CpuMatmul.blas
    try:
        use_onednn(CpuMatmul.onednn)
    except ConfigError:
        return None
    return CpuMatmul.onednn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (e.g. an 8-layer 8B shape)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="bf16")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="steerlm's torch.compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds of --steps steps")
    parser.add_argument("--prompt-fraction", type=float, default=0.0, help="SFT: untrained share of each row")
    parser.add_argument("--lora-rank", type=int, help="LoRA on both sides (alpha 2R), and steerlm's full step too")
    parser.add_argument("--recompute", choices=["uniform", "block"], help="also steerlm with model.recompute")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    overrides = [f"model={args.preset}"] + ([f"model.num_layers={args.layers}"] if args.layers else [])
    model = to_typed(compose("demo", overrides)).model
    dtype = DType(args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    rows, seq = args.micro_batch_size, args.seq_length
    prompt = round(args.prompt_fraction * seq)
    if not 0 <= prompt < seq:
        parser.error(f"--prompt-fraction {args.prompt_fraction}: must leave at least one trained position, in [0, 1)")
    adapters = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
    layout = runtime.initialize(ParallelConfig(), seed=1)
    auto = CpuMatmul.auto
    builders = {
        "hf": lambda: hf_step(model, dtype, rows, seq, prompt, device, adapters),
        "steerlm": lambda: steerlm_step(model, dtype, rows, seq, prompt, compile_model, layout, auto, adapters),
    }
    if adapters is not None:
        builders["full"] = lambda: steerlm_step(model, dtype, rows, seq, prompt, compile_model, layout)
    if args.recompute:
        recomputed = dataclasses.replace(model, recompute=Recompute(args.recompute))
        builders["recomputed"] = lambda: steerlm_step(
            recomputed, dtype, rows, seq, prompt, compile_model, layout, auto, adapters
        )
    other = _other_cpu_products(device)
    if other is not None:  # steerlm on the product library `auto` did not pick, side by side
        builders[other.value] = lambda: steerlm_step(
            model, dtype, rows, seq, prompt, compile_model, layout, other, adapters
        )
    if device.type == "cuda":
        results = measure_in_turn(builders, device, args.warmup, args.steps)
    else:
        results = measure_alternating(builders, device, args.warmup, args.steps, args.rounds)
    runtime.shutdown()
    tokens, per_token = rows * seq, flops_per_token(model, seq)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''} ({model.num_parameters() / 1e9:.3f}B) "
        f"{args.dtype} seq {seq} x micro batch {rows} on {name}, steerlm compile {'on' if compile_model else 'off'}"
        + (f", SFT: first {prompt} positions of each row untrained" if prompt else "")
        + (f", LoRA rank {adapters.rank} on both sides (full: steerlm training every weight)" if adapters else "")
    )
    for key, result in results.items():
        result.update(tokens_per_s=tokens / result["seconds"], tflops=per_token * tokens / result["seconds"] / 1e12)
        peak = f" {result['peak_gib']:7.1f} GiB peak" if "peak_gib" in result else ""
        print(
            f"  {key:10s} {result['seconds'] * 1e3:9.1f} ms/step {result['tokens_per_s']:10.0f} tokens/s "
            f"{result['tflops']:8.2f} TFLOP/s{peak}"
        )
    ratio = results["hf"]["seconds"] / results["steerlm"]["seconds"]
    print(f"  ratio steerlm / hf (throughput): {ratio:.3f}")
    if "full" in results:
        gain = results["full"]["seconds"] / results["steerlm"]["seconds"]
        print(f"  ratio steerlm LoRA / steerlm full fine-tuning (throughput): {gain:.3f}")
    if "recomputed" in results:
        cost = results["steerlm"]["seconds"] / results["recomputed"]["seconds"]
        print(f"  ratio steerlm with model.recompute={args.recompute} / steerlm (throughput): {cost:.3f}")
    if other is not None:
        gain = results[other.value]["seconds"] / results["steerlm"]["seconds"]
        print(f"  ratio steerlm (auto) / steerlm with parallel.cpu_matmul={other.value}: {gain:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            shape = {
                "preset": args.preset,
                "layers": args.layers,
                "dtype": args.dtype,
                "seq_length": seq,
                "micro_batch_size": rows,
                "prompt": prompt,
                "lora_rank": args.lora_rank,
                "recompute": args.recompute,
                "device": name,
            }
            json.dump({**shape, **results, "ratio": ratio}, out)


if __name__ == "__main__":
    main()
