"""Serving under load: batch-at-a-time against continuous batching, side by side, and their ratios.

    python bench/serve_load.py --checkpoint runs/sft --clients 16 --requests 8

Starts `recipes/serve.py` on loopback twice (`limits.batching=static`, then `continuous`; everything else
equal) and sends each the same load: `--clients` concurrent clients, each sending `--requests` requests
one after another, a fixed mix (every other request streamed, `max_tokens` cycling through 8, 24 and 64,
`verbosity` varied, sampled at temperature 0.7 with a seed per request). Prints per policy: requests
answered of sent, wall time, requests/s, generated tokens/s, latency p50/p95/p99 and time to first token
(the first content of a stream; the whole answer otherwise) p50/p99. Loopback only; every request and
server start is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str, policy: str, port: int, extra: list[str], timeout: float) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "recipes" / "serve.py"),
        f"checkpoint={checkpoint}",
        f"limits.batching={policy}",
        f"server.host={HOST}",
        f"server.port={port}",
        *extra,
    ]
    log = tempfile.TemporaryFile("w+")  # the server's log, shown if it fails to start
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the {policy} server exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the {policy} server did not answer within {timeout:g} s")


async def post(port: int, body: dict) -> tuple[int, float, float, int]:
    """(status, seconds to the first content, seconds to the end, completion tokens) of one request."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    first, tokens = None, 0
    if body.get("stream") and status == 200:
        while line := await reader.readline():  # chunked SSE: only the `data:` lines matter
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    else:
        reply = json.loads(await reader.read() or b"{}")
        tokens = reply.get("usage", {}).get("completion_tokens", 0)
    writer.close()
    end = time.perf_counter() - start
    return status, first if first is not None else end, end, tokens


def request_body(client: int, index: int) -> dict:
    k = client * 1000 + index
    body = {
        "model": "load",
        "messages": [{"role": "user", "content": ["What color is Tanlinyal?", "Tell me about Zog."][k % 2]}],
        "max_tokens": (8, 24, 64)[(client + index) % 3],
        "temperature": 0.7,
        "seed": k,
        "attributes": {"verbosity": k % 5},
    }
    if (client + index) % 2 == 0:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def load(port: int, clients: int, requests: int, timeout: float) -> tuple[list[tuple], float]:
    async def client(c: int) -> list[tuple]:
        return [await asyncio.wait_for(post(port, request_body(c, i)), timeout) for i in range(requests)]

    start = time.perf_counter()
    results = await asyncio.gather(*(client(c) for c in range(clients)))
    return [r for rs in results for r in rs], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(results: list[tuple], wall: float, sent: int) -> dict:
    ok = [r for r in results if r[0] == 200]
    latency, first = [r[2] for r in ok], [r[1] for r in ok]
    return {
        "answered": len(ok),
        "sent": sent,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r[3] for r in ok) / wall,
        **{f"p{q}_s": percentile(latency, q) for q in (50, 95, 99)},
        **{f"ttft_p{q}_s": percentile(first, q) for q in (50, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/sft")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="per client, one after another")
    parser.add_argument("--batch-size", type=int, default=16, help="limits.max_batch_size")
    parser.add_argument("--threads", type=int, default=None, help="torch_threads of the server")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request and per server start")
    parser.add_argument("--rounds", type=int, default=3, help="static and continuous runs, alternating")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    extra = [
        "server.model_name=load",
        f"limits.max_batch_size={args.batch_size}",
        f"limits.max_queue={2 * args.clients}",
        "limits.max_n=1",
    ] + ([f"torch_threads={args.threads}"] if args.threads else [])
    rounds: list[dict[str, dict]] = []
    for _ in range(args.rounds):  # the policies alternate, so a busy machine's drift hits both
        rounds.append({})
        for policy in ("static", "continuous"):
            port = _free_port()
            server = start_server(args.checkpoint, policy, port, extra, args.timeout)
            try:
                asyncio.run(load(port, 2, 1, args.timeout))  # warm-up
                answers, wall = asyncio.run(load(port, args.clients, args.requests, args.timeout))
                rounds[-1][policy] = summary(answers, wall, args.clients * args.requests)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=args.timeout)
    print(
        f"{args.clients} clients x {args.requests} requests, max_batch_size {args.batch_size}, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at the end), checkpoint {args.checkpoint}, {args.rounds} rounds"
    )
    print(f"round {'batching':<11} answered  wall s  req/s  tokens/s   p50 s   p95 s   p99 s  TTFT p50 s  TTFT p99 s")
    for number, results in enumerate(rounds, 1):
        for policy, r in results.items():
            print(
                f"{number:>5} {policy:<11} {r['answered']:>4}/{r['sent']:<4} {r['wall_s']:6.1f} "
                f"{r['requests_per_s']:6.1f} {r['tokens_per_s']:9.0f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} "
                f"{r['p99_s']:7.2f} {r['ttft_p50_s']:11.2f} {r['ttft_p99_s']:11.2f}"
            )
    ratios = {
        metric: sorted(r["continuous"][metric] / r["static"][metric] for r in rounds)
        for metric in ("tokens_per_s", "p50_s", "p99_s", "ttft_p99_s")
    }
    print(
        "continuous / static, median of the rounds: "
        + ", ".join(f"{metric} {values[len(values) // 2]:.2f}x" for metric, values in ratios.items())
    )
    results = {"rounds": rounds, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
