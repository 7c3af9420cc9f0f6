"""Shared-prefix scoring: GRPO-shaped batches (G replies per prompt) scored with each prompt run
once per packed row (its replies after it), against the same scorer with sharing off, and
(``--loop``) the model card's batch-1 loop, in the same process.

Workloads (real text from ../shared/data): ``grpo-G``: 4 Arena-Hard prompts of about 300
tokens, G PandaLM replies each (about 80% of the tokens are prompt); ``no-shared``: real
hh-rlhf / LLMBar / PandaLM conversations, nothing in common (sharing must not cost).
Models: random weights with real dimensions (``QWEN2_DIMENSIONS``: "tiny", "0.5b", "7b"),
real Qwen2 vocabulary, written to a temporary checkpoint and loaded with
``RewardModel.from_pretrained`` (the engine as users get it: on CPU in fp32 that is the fused
forward with per-segment attention; ``--from-model`` times a model handed to
``RewardModel.from_model`` instead, which keeps the model's own attention). Throughput counts the tokens of the full sequences (what a caller
asked to score), so sharing shows up as more tokens per second. (GPU MFU: bench_gpu.py.)

Usage:
  python benchmarks/bench_shared_prefix.py                            # 0.5b, fp32, CPU
  python benchmarks/bench_shared_prefix.py --models 7b --device cuda --dtype bf16
  python benchmarks/bench_shared_prefix.py --models small --prompts 6 --groups 8 \
      --prompt-chars 2400 --loop --no-unshared --repeats 1    # the issue-22 GRPO workload

Prints a table and ends with one JSON line of the figures and ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def timed(rm: Any, samples: list[Any], repeats: int, sync: Any) -> tuple[float, list[float]]:
    rm.score(samples)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        scores = rm.score(samples)
    sync()
    return (time.perf_counter() - start) / repeats, scores


def card_loop(rm: Any, samples: list[Any], repeats: int, sync: Any) -> tuple[float, list[float]]:
    """The model card's way: one sample at a time, its ids alone, no mask, no padding."""
    import torch

    from worldpm_reward.samples import parse_sample

    ids = [rm.encoder.encode(parse_sample(s)).input_ids for s in samples]

    def run() -> list[float]:
        with torch.inference_mode():
            return [float(rm.model(torch.tensor([x], device=rm.device))[0]) for x in ids]

    run()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        scores = run()
    sync()
    return (time.perf_counter() - start) / repeats, scores


def main() -> None:
    import torch

    from worldpm_reward import RewardModel
    from worldpm_reward.checkpoints import resolve_dtype
    from worldpm_reward.samples import parse_sample
    from worldpm_reward.testing import (
        QWEN2_DIMENSIONS,
        grpo_groups,
        random_worldpm,
        real_conversations,
        write_tiny_worldpm,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["0.5b"], choices=sorted(QWEN2_DIMENSIONS))
    p.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16], help="replies per prompt (G)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompt-chars", type=int, default=1200, help="length of the Arena-Hard prompts chosen")
    p.add_argument("--loop", action="store_true", help="also time the model card's batch-1 loop")
    p.add_argument("--no-unshared", action="store_true", help="skip the no-shared workload")
    p.add_argument(
        "--from-model",
        action="store_true",
        help="wrap an in-memory model with RewardModel.from_model (its own attention) instead of loading a checkpoint",
    )
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    workloads: dict[str, list[Any]] = {
        f"grpo-{g}": grpo_groups(args.prompts, g, prompt_chars=args.prompt_chars) for g in args.groups
    }
    if not args.no_unshared:
        workloads["no-shared"] = [{"messages": c} for c in real_conversations(32)]
    figures: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "load_average_start": os.getloadavg(),
    }
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()
    print(
        f"{'model':>5} {'workload':>10} {'tokens':>7} {'shared':>7} {'unshared tok/s':>15} {'shared tok/s':>13} {'ratio':>6} {'max|diff|':>9}"
    )
    tmp = tempfile.TemporaryDirectory(prefix="bench-shared-prefix-")
    figures["loaded_with"] = "from_model" if args.from_model else "from_pretrained"
    for name in args.models:
        if args.from_model:
            rm = random_worldpm(seed=0, max_length=4096, device=args.device, **QWEN2_DIMENSIONS[name])
            rm.model.to(dtype=resolve_dtype(args.dtype, args.device))
            plain = type(rm).from_model(
                rm.model,
                rm.tokenizer,
                family="worldpm",
                config=rm.config.replace(shared_prefix=False, max_length=4096),
            )
        else:
            path = write_tiny_worldpm(Path(tmp.name) / name, seed=0, **QWEN2_DIMENSIONS[name])
            options: dict[str, Any] = dict(device=args.device, dtype=args.dtype, max_length=4096)
            rm = RewardModel.from_pretrained(path, **options)
            plain = RewardModel.from_pretrained(path, shared_prefix=False, **options)
        for workload, samples in workloads.items():
            lengths = [len(rm.encoder.encode(parse_sample(s)).input_ids) for s in samples]
            t_plain, s_plain = timed(plain, samples, args.repeats, sync)
            t_shared, s_shared = timed(rm, samples, args.repeats, sync)
            if args.loop:
                t_loop, s_loop = card_loop(rm, samples, args.repeats, sync)
            st = rm.last_stats
            diff = max(abs(a - b) for a, b in zip(s_plain, s_shared))
            row = {
                "tokens": sum(lengths),
                "prefix_tokens_skipped": st.shared_prefix_tokens,
                "unshared_tokens_per_s": round(sum(lengths) / t_plain, 1),
                "shared_tokens_per_s": round(sum(lengths) / t_shared, 1),
                "ratio": round(t_plain / t_shared, 3),
                "max_score_diff": diff,
            }
            if args.loop:
                row["loop_tokens_per_s"] = round(sum(lengths) / t_loop, 1)
                row["shared_over_loop"] = round(t_loop / t_shared, 3)
                row["max_score_diff_vs_loop"] = max(abs(a - b) for a, b in zip(s_loop, s_shared))
                print(
                    f"      card loop {row['loop_tokens_per_s']:.0f} tok/s: sharing on is {row['shared_over_loop']:.2f}x "
                    f"the loop (max |diff| {row['max_score_diff_vs_loop']:.1e})"
                )
            figures[f"{name}/{workload}"] = row
            print(
                f"{name:>5} {workload:>10} {row['tokens']:>7} {st.shared_prefix_tokens / sum(lengths):>6.0%} "
                f"{row['unshared_tokens_per_s']:>15.0f} {row['shared_tokens_per_s']:>13.0f} {row['ratio']:>5.2f}x {diff:>9.1e}"
            )
    figures["load_average_end"] = os.getloadavg()
    tmp.cleanup()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
