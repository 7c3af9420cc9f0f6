"""GPU figures of the transformers engine: MFU on ~1k-token samples, the padding cap's effect,
and shared-prefix scoring of GRPO groups (bf16, random weights with Qwen2-7B dimensions).

Sections, all on one model in one process:
  * mfu:     real multi-turn text of about 1k tokens per sample (consecutive real
             conversations joined), scored with sharing off; model FLOP
             utilisation against the device's dense bf16 peak (``--peak-tflops``, the spec
             sheet) and against a measured 8192^3 bf16 matrix product.
  * padding: real hh-rlhf/LLMBar/PandaLM conversations (the skewed lengths of chat data),
             with the padding cap at 0.05, 0.3 (the GPU default) and 1.0 (no cap).
  * shared:  GRPO groups (4 prompts of about 1k tokens, G replies each), sharing on vs off.

Usage (on a CUDA machine):
  python benchmarks/bench_gpu.py --peak-tflops 989

Prints a table per section and ends with one JSON line of the figures measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def model_flops(lengths: list[int], computed: int, dims: dict[str, int]) -> float:
    """Forward FLOPs: 2 x non-embedding matmul parameters per computed position + causal attention."""
    h, i, n = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return 2 * n * per_layer * computed + sum(2 * n * h * t * t for t in lengths)


def packed_conversations(n: int, rm: Any, target: int = 1000) -> list[Any]:
    """``n`` multi-turn conversations of about ``target`` tokens, each made of consecutive real
    conversations (hh-rlhf, LLMBar, PandaLM, HHH) joined turn after turn."""
    from worldpm_reward.testing import real_conversations

    source = real_conversations(1000)
    out, current, size = [], [], 0
    for conv in source * 8:
        current.extend(conv)
        size += sum(len(rm.tokenizer.encode(m["content"])) + 5 for m in conv)
        if size >= target:
            out.append({"messages": current})
            current, size = [], 0
            if len(out) == n:
                break
    return out


def main() -> None:
    import torch

    from worldpm_reward.samples import parse_sample
    from worldpm_reward.testing import QWEN2_DIMENSIONS, grpo_groups, random_worldpm, real_conversations

    dims = QWEN2_DIMENSIONS["7b"]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (spec)")
    p.add_argument("--n", type=int, default=256, help="samples per section")
    p.add_argument("--attn", default="sdpa")
    args = p.parse_args()
    sync = torch.cuda.synchronize
    figures: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    matmul_tflops = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    figures["matmul_bf16_tflops"] = round(matmul_tflops, 1)
    del a

    rm = random_worldpm(seed=0, max_length=4096, device="cuda", **dims)
    rm.model.to(torch.bfloat16)
    rm.model.config._attn_implementation = args.attn

    def run(samples: list[Any], **changes: Any) -> tuple[float, list[float], Any]:
        scorer = type(rm).from_model(
            rm.model, rm.tokenizer, family="worldpm", config=rm.config.replace(**changes)
        )
        scorer.score(samples[:8])  # warm-up
        sync()
        t0 = time.perf_counter()
        scores = scorer.score(samples)
        sync()
        return time.perf_counter() - t0, scores, scorer.last_stats

    def lengths(samples: list[Any]) -> list[int]:
        return [len(rm.encoder.encode(parse_sample(s)).input_ids) for s in samples]

    # -- mfu ------------------------------------------------------------------------------
    long = packed_conversations(args.n, rm)
    lens = lengths(long)
    secs, _, st = run(long, shared_prefix=False)
    fl = model_flops(lens, st.padded_tokens, dims)
    figures["mfu"] = {
        "samples": len(long),
        "median_tokens": sorted(lens)[len(lens) // 2],
        "tokens_per_s": round(sum(lens) / secs),
        "tflops": round(fl / secs / 1e12, 1),
        "mfu_vs_spec": round(fl / secs / 1e12 / args.peak_tflops, 3),
        "mfu_vs_matmul": round(fl / secs / 1e12 / matmul_tflops, 3),
        "padding": round(st.padding_fraction, 4),
    }
    print("mfu", json.dumps(figures["mfu"]))

    # -- padding cap ----------------------------------------------------------------------
    chat = [{"messages": c} for c in real_conversations(args.n)]
    lens = lengths(chat)
    figures["padding"] = {}
    for cap in (0.05, 0.3, 1.0):
        secs, _, st = run(chat, shared_prefix=False, max_padding_fraction=cap)
        figures["padding"][str(cap)] = {
            "tokens_per_s": round(sum(lens) / secs),
            "padding": round(st.padding_fraction, 4),
            "batches": st.num_batches,
            "mfu_vs_spec": round(
                model_flops(lens, st.padded_tokens, dims) / secs / 1e12 / args.peak_tflops, 3
            ),
        }
        print("padding cap", cap, json.dumps(figures["padding"][str(cap)]))

    # -- shared prefix --------------------------------------------------------------------
    figures["shared"] = {}
    for g in (4, 8, 16):
        groups = grpo_groups(n_prompts=4, group_size=g, prompt_chars=3600)
        total = sum(lengths(groups))
        t_off, s_off, _ = run(groups, shared_prefix=False)
        t_on, s_on, st = run(groups)
        figures["shared"][f"G={g}"] = {
            "tokens": total,
            "shared_share": round(st.shared_prefix_tokens / total, 3),
            "off_tokens_per_s": round(total / t_off),
            "on_tokens_per_s": round(total / t_on),
            "ratio": round(t_off / t_on, 2),
            "max_score_diff_bf16": round(max(abs(x - y) for x, y in zip(s_off, s_on)), 4),
            "score_range": round(max(s_off) - min(s_off), 4),
        }
        print("shared", g, json.dumps(figures["shared"][f"G={g}"]))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
