"""engine="fsdp" (one reward model sharded over the ranks) against one full copy per rank, in
one run: per-rank resident parameters, load time, and the time to score each rank's own
share of real conversations, both ways, on the same ranks at the same moment.

Usage:
  python benchmarks/bench_sharded.py                       # 2 ranks, "small" model, CPU (gloo)
  python benchmarks/bench_sharded.py --nproc 2 --size 0.5b --n 32
  python benchmarks/bench_sharded.py --nproc 8 --size 7b --device cuda --dtype bf16   # one node (NCCL)

The script writes a random-weight WorldPM-layout checkpoint (real Qwen2 dimensions,
``QWEN2_DIMENSIONS``) and relaunches itself under torchrun. Every rank scores its own slice
of the conversations, sharded (collective: each forward all-gathers each layer) and with a
full copy loaded beside it. On a GPU it also times ``offload()`` / ``onload()`` (the shard to
CPU memory and back). Prints a table, then one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from worldpm_reward import RewardModel
    from worldpm_reward.testing import real_conversations

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    on_gpu = args.device == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(device)
    mine = real_conversations(args.n)[rank::world]  # each rank its own share (uneven when n % world)
    opts: dict[str, Any] = {"device": device, "dtype": args.dtype, "max_length": args.max_length}

    start = time.perf_counter()
    sharded = RewardModel.from_pretrained(args.checkpoint, engine="fsdp", **opts)
    load_sharded = time.perf_counter() - start
    start = time.perf_counter()
    full = RewardModel.from_pretrained(args.checkpoint, shared_prefix=False, **opts)
    load_full = time.perf_counter() - start

    def timed(rm: Any) -> tuple[float, list[float]]:
        rm.score(mine)  # warm-up (every rank: the sharded one is collective)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            scores = rm.score(mine)
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.repeats
        dist.barrier()
        return elapsed, scores

    t_full, want = timed(full)
    t_sharded, got = timed(sharded)
    mem = sharded.engine.memory()
    figures: dict[str, Any] = {
        "rank": rank,
        "samples": len(mine),
        "tokens": sharded.last_stats.real_tokens,
        "resident_params": mem.resident,
        "total_params": mem.total,
        "resident_gb": mem.resident_bytes / 1e9,
        "full_copy_gb": mem.full_copy_bytes / 1e9,
        "checkpoint_elements_read": sharded.engine.elements_read,
        "load_sharded_s": load_sharded,
        "load_full_s": load_full,
        "score_full_s": t_full,
        "score_sharded_s": t_sharded,
        "dummy_calls": sharded.engine.dummy_calls,
        "max_abs_diff": max((abs(a - b) for a, b in zip(got, want)), default=0.0),
    }
    if on_gpu:
        del full
        torch.cuda.empty_cache()
        figures["allocated_gb_sharded_only"] = torch.cuda.memory_allocated() / 1e9
        sharded.engine.offload()
        figures["allocated_gb_offloaded"] = torch.cuda.memory_allocated() / 1e9
        sharded.engine.onload()
        figures["offload_s"], figures["onload_s"] = (
            sharded.engine.offload_seconds,
            sharded.engine.onload_seconds,
        )
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--size", default="small", help="tiny, small, 0.5b, 7b (QWEN2_DIMENSIONS)")
    parser.add_argument("--n", type=int, default=48, help="conversations in all, split over the ranks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(argparse.Namespace(**json.loads(os.environ["BENCH_SHARDED_ARGS"])))
        return

    from worldpm_reward.testing import QWEN2_DIMENSIONS, write_tiny_worldpm

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_worldpm(Path(tmp) / "rm", seed=0, **QWEN2_DIMENSIONS[args.size])
        out = Path(tmp) / "figures.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
        ]
        cmd += [__file__, "--worker"]  # its options travel in the environment (torchrun parses --n)
        worker_args = {**vars(args), "checkpoint": str(ckpt), "out": str(out), "worker": True}
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "BENCH_SHARDED_ARGS": json.dumps(worker_args),
        }
        subprocess.run(cmd, check=True, env=env)
        ranks = json.loads(out.read_text())

    print(f"model {args.size}, {args.nproc} ranks, {args.device} {args.dtype}, {args.n} conversations")
    print(
        "| rank | samples | resident params | resident / full copy | score full (s) | score sharded (s) | sharded / full |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(
            f"| {r['rank']} | {r['samples']} | {r['resident_params']:,} | "
            f"{r['resident_gb']:.3f} / {r['full_copy_gb']:.3f} GB | {r['score_full_s']:.2f} | "
            f"{r['score_sharded_s']:.2f} | {r['score_sharded_s'] / r['score_full_s']:.2f}x |"
        )
    slowest_full = max(r["score_full_s"] for r in ranks)
    slowest_sharded = max(r["score_sharded_s"] for r in ranks)
    summary = {
        "bench": "sharded",
        "size": args.size,
        "nproc": args.nproc,
        "device": args.device,
        "conversations": args.n,
        "resident_fraction": max(r["resident_params"] for r in ranks) / ranks[0]["total_params"],
        "step_time_ratio_sharded_vs_full": slowest_sharded / slowest_full,
        "max_abs_diff": max(r["max_abs_diff"] for r in ranks),
        "ranks": ranks,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
