"""What serving LoRA adapters per row costs the lean decoder, side by side on one model and one process: a batch
decoded with no adapter bank, with a bank whose rows all use the model alone, with one row of the batch on an
adapter (the others on the model alone: only that row runs the adapter's products), and with every row on one of
`--adapters` adapters (rank `--rank`, every linear adapted; random, as only the arithmetic's cost is measured).

    python bench/adapter_serving.py --preset small --batch-size 8 --adapters 4 --rank 16

Each side prefills `--prompt-tokens` per row and decodes `--new-tokens` steps; rounds alternate the sides and each
side's best round is reported, as tokens/s and as a ratio to the side without a bank. `--json` also writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from steerlm import runtime
from steerlm.config import ParallelConfig, PrecisionConfig, compose, to_typed
from steerlm.inference.adapters import AdapterBank
from steerlm.inference.decoders import LeanDecoder
from steerlm.models import build_model_chunks

LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def random_bank(model: torch.nn.Module, adapters: int, rank: int) -> AdapterBank:
    """A bank of `adapters` random adapters on every linear of `model` (index 0: none)."""
    generator = torch.Generator().manual_seed(0)
    bank = AdapterBank([f"random{i}" for i in range(1, adapters + 1)])
    for index, layer in enumerate(model.decoder.layers):
        for name in LINEARS:
            parent = layer.self_attention if name in ("linear_qkv", "linear_proj") else layer.mlp
            weight = getattr(parent, name).weight
            out, into = weight.shape
            a = torch.randn(adapters + 1, rank, into, generator=generator, dtype=weight.dtype) * 0.01
            b = torch.randn(adapters + 1, out, rank, generator=generator, dtype=weight.dtype) * 0.01
            a[0], b[0] = 0, 0
            bank.a[(index, name)], bank.b[(index, name)] = a, b
    return bank


def decode(model, layout, bank: AdapterBank | None, rows: list[int], prompt: int, steps: int) -> float:
    """Seconds to prefill every row and decode `steps` tokens each."""
    length = prompt + steps + 1
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 200, (len(rows), prompt), generator=generator).tolist()
    decoder = LeanDecoder(model, layout, length, bank)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = decoder.add(prompts, length, (), rows if bank is not None else None)[0]
        for _ in range(steps):
            logits = decoder.step(logits.argmax(-1))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    model_cfg = to_typed(compose("demo", [f"model={args.preset}"])).model
    layout = runtime.initialize(ParallelConfig(), seed=0)
    try:
        model = build_model_chunks(model_cfg, PrecisionConfig(), layout, seed=0)[0].eval()
        bank = random_bank(model, args.adapters, args.rank)
        mixed = [1 + row % args.adapters for row in range(args.batch_size)]
        sides = {"no bank": (None, [0] * args.batch_size), "bank, no adapter rows": (bank, [0] * args.batch_size)}
        sides["one row on an adapter"] = (bank, [1] + [0] * (args.batch_size - 1))
        sides[f"every row on one of {args.adapters} adapters"] = (bank, mixed)
        best = {name: float("inf") for name in sides}
        for _ in range(args.rounds):
            for name, (held, rows) in sides.items():
                seconds = decode(model, layout, held, rows, args.prompt_tokens, args.new_tokens)
                best[name] = min(best[name], seconds)
    finally:
        runtime.shutdown()
    tokens = args.batch_size * args.new_tokens
    baseline = best["no bank"]
    print(
        f"{args.preset}, batch {args.batch_size}, rank {args.rank}, {args.new_tokens} new tokens a row, best of "
        f"{args.rounds} rounds"
    )
    for name, seconds in best.items():
        print(f"{name:<34} {tokens / seconds:>9.1f} tokens/s  {baseline / seconds:.3f}x")
    if args.json:
        figures = {name: {"seconds": s, "tokens_per_s": tokens / s, "ratio": baseline / s} for name, s in best.items()}
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "sides": figures}, handle, indent=1)


if __name__ == "__main__":
    main()
