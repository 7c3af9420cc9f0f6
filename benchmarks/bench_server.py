"""The reward server under OpenRLHF's traffic pattern: N concurrent clients, each sending
ONE sample per request (closed loop), on real conversations from ../shared/data.

Compares, in the same run and on the same checkpoint:
  * batched: ``worldpm-reward serve`` with cross-request dynamic batching (defaults);
  * serial:  the same server with batching off (``--max-batch-samples 1``): every request
             is scored alone, as OpenRLHF's ``serve_rm`` does;
  * batched-in-process: batching on, but the model in the server process (``--in-process``),
             sharing one GIL with the HTTP front end (the server's default runs it in a child).
Reports throughput (samples/s) and p50/p99 latency per concurrency level, then the
batched/serial ratios. Servers run as separate processes on loopback.

Usage:
  python benchmarks/bench_server.py                       # "small" random checkpoint, N = 1 16 64 256
  python benchmarks/bench_server.py --size tiny           # HTTP-overhead-bound toy model
  python benchmarks/bench_server.py --model DIR --concurrency 32 256 --requests 1024

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small")  # worldpm_reward.testing.QWEN2_DIMENSIONS


async def _load(url: str, queries: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    todo = list(reversed(queries))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            payload = todo.pop()
            start = time.perf_counter()
            r = await client.post(f"{url}/get_reward", json=payload)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    # one client (one keep-alive connection) per simulated rollout worker, as N independent
    # workers are: a single pooled client costs O(waiting requests) per answer when answers
    # arrive together, and the load generator, not the server, became the bottleneck
    # (measured: 5x the load generator's CPU for batched answers at N = 256)
    clients = [
        httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1)) for _ in range(concurrency)
    ]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in clients))
        seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    latencies.sort()
    return {
        "samples_per_s": len(queries) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:

    from worldpm_reward.testing import (
        QWEN2_DIMENSIONS,
        real_conversations,
        server_process,
        write_tiny_worldpm,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random one of --size)")
    p.add_argument(
        "--size",
        default="small",
        choices=sorted(SIZES),
        help="tiny: hidden 32 x 2 layers (HTTP overhead dominates); small: hidden 512 x 8 layers "
        "(compute dominates, as with a real reward model)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--requests", type=int, default=512, help="single-sample requests per measurement")
    args = p.parse_args()

    model = (
        Path(args.model)
        if args.model
        else write_tiny_worldpm(Path(tempfile.mkdtemp()) / args.size, **QWEN2_DIMENSIONS[args.size])
    )
    convs = real_conversations(args.requests)
    queries = []
    for c in convs:  # ChatML-rendered, as a Qwen/SmolLM policy's tokenizer would decode it
        prompt = (
            "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in c[:-1])
            + "<|im_start|>assistant\n"
        )
        queries.append(
            {"query": [prompt + c[-1]["content"] + "<|im_end|>"], "prompts": [prompt], "labels": [None]}
        )

    figures: dict[str, Any] = {"requests": len(queries), "model": str(model), "size": args.size}
    rows = {}
    modes = {
        "serial": ["--max-batch-samples", "1", "--max-wait-ms", "0"],
        "batched": [],
        "batched-in-process": ["--in-process"],
    }
    for mode, extra in modes.items():
        with server_process(model, *extra) as (url, _):
            asyncio.run(_load(url, queries[:32], 8))  # warm-up
            for n in args.concurrency:
                rows[(mode, n)] = asyncio.run(_load(url, queries, n))
    print(f"{'N':>5} {'mode':>20} {'samples/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for n in args.concurrency:
        for mode in modes:
            r = rows[(mode, n)]
            print(f"{n:>5} {mode:>20} {r['samples_per_s']:>10.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f}")
        s, b, inproc = rows[("serial", n)], rows[("batched", n)], rows[("batched-in-process", n)]
        figures[f"n{n}"] = {
            "serial": {k: round(v, 2) for k, v in s.items()},
            "batched": {k: round(v, 2) for k, v in b.items()},
            "batched_in_process": {k: round(v, 2) for k, v in inproc.items()},
            "throughput_ratio": round(b["samples_per_s"] / s["samples_per_s"], 3),
            "in_process_throughput_ratio": round(inproc["samples_per_s"] / s["samples_per_s"], 3),
            "p50_ratio": round(b["p50_ms"] / s["p50_ms"], 3),
            "p99_ratio": round(b["p99_ms"] / s["p99_ms"], 3),
        }
        print(
            f"{n:>5} batched/serial: throughput {figures[f'n{n}']['throughput_ratio']:.2f}x, "
            f"p50 {figures[f'n{n}']['p50_ratio']:.2f}x, p99 {figures[f'n{n}']['p99_ratio']:.2f}x; "
            f"batched-in-process/serial: {figures[f'n{n}']['in_process_throughput_ratio']:.2f}x"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
