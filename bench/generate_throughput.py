"""Generation throughput, side by side: steerlm's KV-cache generator — with its lean decoder, megatron-core's
static inference context and, on CUDA, the lean decoder's CUDA-graph form (steerlm.inference.decoders) — vs HF
transformers `generate` (LlamaForCausalLM, dynamic KV cache), greedy, the same Llama shape and the SAME weights
(exported with steerlm.models.hf_llama), one device, one process.

    python bench/generate_throughput.py                                          # tiny model on CPU
    python bench/generate_throughput.py --preset small --batch-sizes 1 8         # 52M model on CPU
    python bench/generate_throughput.py --preset llama3_2_1b --dtype bf16        # GPU

Every prompt is continued by exactly --new-tokens tokens (no stop token), at batch 1 and 32 by default. HF runs
without the CPU stand-ins steerlm installs for megatron-core (which would slow every op it makes). Prints
generated tokens/s of each, the steerlm / HF ratios, and whether all produced the same tokens; where a row's
tokens differ, whether HF's own logits tied at the first difference (in bf16 greedy decoding, a tie broken the
other way by rounding is no decoding error); `--json` also writes them to a file. Where `parallel.cpu_matmul=auto`
picks oneDNN (AMD CPUs), `lean_blas` is the lean decoder on torch's BLAS: the ratio to `lean` is what oneDNN's
products give.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from steerlm import megatron_compat, runtime
from steerlm.config import DType, ParallelConfig, PrecisionConfig, compose, to_typed
from steerlm.config.schema import CpuMatmul, ModelConfig
from steerlm.inference import Generator, SamplingParams
from steerlm.inference.decoders import GraphedLeanDecoder
from steerlm.models import build_model_chunks
from steerlm.models.gpt import torch_dtype
from steerlm.models.hf_llama import hf_config_dict, megatron_to_hf
from steerlm.models.sharding import named_global_parameters
from steerlm.runtime.cpu_matmul import install, use_onednn


class _Vocabulary:
    """The generator's view of a tokenizer when only ids matter (nothing is decoded into text here)."""

    def __init__(self, size: int) -> None:
        self.vocab_size, self.pad_id = size, 0

    def decode(self, ids) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_of(runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, tuple[float, Any]]:
    """Each run's best wall time over `repeats` rounds after one warm-up call each, and its last output. The
    rounds interleave the runs (one call of each per round), so load that drifts on shared cores weighs on
    every side alike."""
    outputs = {name: run() for name, run in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            outputs[name] = run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outputs[name]) for name in runs}


def _step(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s numbers at `value`: what one rounding can change it by."""
    info = torch.finfo(dtype)
    exponent = math.floor(math.log2(abs(value))) if value else math.log2(info.tiny)
    return info.eps * 2.0**exponent


def untied_differences(hf, prompts: torch.Tensor, reference: list[list[int]], tokens: list[list[int]]) -> int:
    """How many of the rows whose `tokens` differ from HF's `reference` do NOT differ at a tie: at the row's first
    differing position, HF's logit for HF's token exceeds its logit for ours by more than one step of HF's dtype
    there (the logits are computed in HF's dtype). Random models put many tokens within a rounding of each other,
    so bf16 implementations that round differently pick different ones of them."""
    untied = 0
    for row, (ours, theirs) in enumerate(zip(tokens, reference)):
        if ours == theirs:
            continue
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        context = torch.tensor([prompts[row].tolist() + theirs[:first]], device=hf.device)
        with torch.inference_mode(), megatron_compat.lifted():
            logits = hf(context).logits[0, -1]
        theirs_logit, ours_logit = float(logits[theirs[first]]), float(logits[ours[first]])
        untied += theirs_logit - ours_logit > _step(theirs_logit, hf.dtype)
    return untied


def _on_blas(run: Callable[[], Any]) -> Any:
    """`run()` with every CPU product on torch's BLAS (`parallel.cpu_matmul=blas`), then oneDNN again."""
    install(CpuMatmul.blas)
    try:
        return run()
    finally:
        install(CpuMatmul.auto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="fp32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    model: ModelConfig = to_typed(compose("demo", [f"model={args.preset}"])).model
    layout = runtime.initialize(ParallelConfig(), seed=0)
    device = layout.device
    onednn = device.type == "cpu" and use_onednn(CpuMatmul.auto)
    precision = PrecisionConfig(dtype=DType(args.dtype))
    chunks = build_model_chunks(model, precision, layout, seed=0)
    limit = args.prompt_tokens + args.new_tokens + 1
    generators = {
        name: Generator(chunks, _Vocabulary(model.vocab_size), layout, limit, (), decoder=name)
        for name in ("lean", "megatron")
    }
    if device.type == "cuda":
        generators["graphed"] = Generator(chunks, _Vocabulary(model.vocab_size), layout, limit, (), decoder="lean")
        generators["graphed"].decoder = GraphedLeanDecoder
    full = {name: param.detach() for name, param in named_global_parameters(chunks)}
    hf_config = LlamaConfig(**{k: v for k, v in hf_config_dict(model).items() if k != "architectures"})
    hf = LlamaForCausalLM(hf_config).to(device=device, dtype=torch_dtype(precision.dtype)).eval()
    hf.load_state_dict(megatron_to_hf(full, model), strict=False)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{args.preset} ({model.num_parameters() / 1e6:.2f}M parameters) {args.dtype} on {device_name}: greedy, "
        f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens per row, best of {args.repeats}"
    )
    results: dict[int, dict] = {}
    for rows in args.batch_sizes:
        prompts = torch.randint(
            3, model.vocab_size, (rows, args.prompt_tokens), generator=torch.Generator().manual_seed(rows)
        )
        params = [SamplingParams(max_new_tokens=args.new_tokens)] * rows

        def hf_generate(p=prompts):
            with torch.inference_mode(), megatron_compat.lifted():
                return hf.generate(
                    p.to(device),
                    attention_mask=torch.ones_like(p, device=device),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )

        runs: dict[str, Callable[[], Any]] = {
            name: lambda g=generator, p=prompts, s=params: g.generate(p.tolist(), s)
            for name, generator in generators.items()
        }
        if onednn:  # the lean decoder on torch's BLAS too: what oneDNN's products give
            runs["lean_blas"] = lambda p=prompts, s=params: _on_blas(lambda: generators["lean"].generate(p.tolist(), s))
        timed = _best_of({**runs, "hf": hf_generate}, device, args.repeats)
        theirs, theirs_out = timed.pop("hf")
        ours = timed
        reference = theirs_out[:, args.prompt_tokens :].tolist()
        tokens = {name: [c.token_ids for c in out] for name, (_, out) in ours.items()}
        same = all(rows_out == reference for rows_out in tokens.values())
        differing = {name: sum(a != b for a, b in zip(rows_out, reference)) for name, rows_out in tokens.items()}
        untied = {name: untied_differences(hf, prompts, reference, rows_out) for name, rows_out in tokens.items()}
        generated = rows * args.new_tokens
        results[rows] = {"hf": generated / theirs, "same_tokens": same, "rows_differing": differing, "untied": untied}
        results[rows].update({name: generated / seconds for name, (seconds, _) in ours.items()})
        verdict = "at ties only" if not any(untied.values()) else "no"
        agreement = "yes" if same else f"{verdict} (rows differing: {differing}; not at a tie: {untied})"
        print(
            f"  batch {rows:3d}: HF {generated / theirs:8.0f} tokens/s | "
            + " | ".join(
                f"steerlm {name} {generated / seconds:8.0f} tokens/s ({theirs / seconds:4.2f}x HF)"
                for name, (seconds, _) in ours.items()
            )
            + f" | same tokens: {agreement}"
        )
    runtime.shutdown()
    if args.json:
        with open(args.json, "w") as out:
            shape = {
                "preset": args.preset,
                "dtype": args.dtype,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "device": device_name,
            }
            json.dump({**shape, "batches": results}, out)


if __name__ == "__main__":
    main()
