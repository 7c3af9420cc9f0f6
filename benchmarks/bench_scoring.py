"""In-process scoring throughput: this scorer vs the model card's loop vs static padded batches.

Methods, all on the same model, the same real conversations and the same token ids:
  * loop:    the model card's way: one conversation at a time, no padding.
  * static:  fixed-size batches in input order, right-padded to the longest sample
             (what OpenRLHF's serve_rm and TRL's model-as-reward path do).
  * scorer:  worldpm_reward.RewardModel: length-sorted, token-budgeted micro-batches.

Each (model, method) runs in its own subprocess so that peak memory is its own. Models:
"tiny" (hidden 32, 2 layers) and "0.5b" (Qwen2-0.5B dimensions, random weights, built in
memory). Conversations come from ../shared/data (hh-rlhf harmless-base test, multi-turn,
plus LLMBar and PandaLM).

Usage:
  python benchmarks/bench_scoring.py                      # both models, fp32
  python benchmarks/bench_scoring.py --models tiny --n 128
  python benchmarks/bench_scoring.py --dtype bf16         # bf16 weights (AMX on recent Xeons, or GPU)
  python benchmarks/bench_scoring.py --models 0.5b --dtype bf16 --loop-dtype fp32   # bf16 scorer vs the fp32 loop

Prints a table and ends with one JSON line of the figures and ratios (scorer / loop,
scorer / static) measured in this run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build(model_name: str, dtype: str, device: str):  # -> RewardModel
    import torch

    from worldpm_reward.checkpoints import resolve_dtype
    from worldpm_reward.testing import QWEN2_DIMENSIONS, random_worldpm

    torch.manual_seed(0)
    rm = random_worldpm(seed=0, max_length=2048, device=device, **QWEN2_DIMENSIONS[model_name])
    rm.model.to(dtype=resolve_dtype(dtype, device))
    return rm


def run_method(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worldpm_reward.samples import parse_sample
    from worldpm_reward.testing import real_conversations

    torch.set_num_threads(args.threads) if args.threads else None
    rm = build(args.model, args.dtype, args.device)
    convs = real_conversations(args.n)
    ids = [rm.encoder.encode(parse_sample(c)).input_ids for c in convs]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def go() -> tuple[list[float], int]:
        if args.method == "loop":
            return [rm.forward_ids([x])[0] for x in ids], sum(map(len, ids))
        if args.method == "static":
            scores, computed = [], 0
            for i in range(0, len(ids), args.static_batch):
                chunk = ids[i : i + args.static_batch]
                scores += rm.forward_ids(chunk)
                computed += len(chunk) * max(map(len, chunk))
            return scores, computed
        results = rm.score_detailed(convs)
        return [r.score for r in results], rm.last_stats.padded_tokens  # type: ignore[misc]

    go()  # warm-up (kernels, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.repeats):
        scores, computed = go()
    sync()
    seconds = (time.perf_counter() - start) / args.repeats
    real = sum(map(len, ids))
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "samples_per_s": len(ids) / seconds,
        "real_tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / computed,
        "peak_mib": peak,
        "seconds": seconds,
        "scores": scores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "0.5b"], choices=["tiny", "0.5b", "7b"])
    p.add_argument("--n", type=int, default=256, help="conversations (tiny); the 0.5b model uses n/4")
    p.add_argument("--dtype", default="fp32")
    p.add_argument(
        "--loop-dtype",
        default=None,
        help="dtype of the loop baseline (e.g. fp32 with --dtype bf16); default --dtype",
    )
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.method:  # child process: one (model, method)
        print(json.dumps(run_method(args)))
        return

    figures: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "loop_dtype": args.loop_dtype or args.dtype,
    }
    print(
        f"{'model':>6} {'method':>7} {'samples/s':>10} {'tokens/s':>10} {'padding':>8} {'peak MiB':>9} {'vs loop':>8}"
    )
    for model in args.models:
        n = args.n if model == "tiny" else max(16, args.n // 4)
        out: dict[str, dict[str, Any]] = {}
        for method in ("loop", "static", "scorer"):
            cmd = [
                sys.executable,
                __file__,
                "--model",
                model,
                "--method",
                method,
                "--n",
                str(n),
                "--dtype",
                (args.loop_dtype or args.dtype) if method == "loop" else args.dtype,
                "--device",
                args.device,
                "--static-batch",
                str(args.static_batch),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[method] = json.loads(res.stdout.strip().splitlines()[-1])
        agree = max(
            abs(a - b) for m in ("static", "scorer") for a, b in zip(out[m]["scores"], out["loop"]["scores"])
        )
        for method, r in out.items():
            ratio = r["samples_per_s"] / out["loop"]["samples_per_s"]
            print(
                f"{model:>6} {method:>7} {r['samples_per_s']:>10.1f} {r['real_tokens_per_s']:>10.0f} "
                f"{r['padding_fraction']:>8.1%} {r['peak_mib']:>9.0f} {ratio:>7.2f}x"
            )
        figures[model] = {
            "n": n,
            **{f"{m}_samples_per_s": round(r["samples_per_s"], 2) for m, r in out.items()},
            **{f"{m}_padding": round(r["padding_fraction"], 4) for m, r in out.items()},
            **{f"{m}_peak_mib": round(r["peak_mib"]) for m, r in out.items()},
            "scorer_vs_loop": round(out["scorer"]["samples_per_s"] / out["loop"]["samples_per_s"], 3),
            "scorer_vs_static": round(out["scorer"]["samples_per_s"] / out["static"]["samples_per_s"], 3),
            "max_score_diff_vs_loop": agree,
        }
        print(f"{model:>6} scores agree with the loop within {agree:.1e}")
    print(json.dumps(figures))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
