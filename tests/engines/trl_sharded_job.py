"""Run by test_sharded.py under `accelerate launch --num_processes 2 --cpu`: a real TRL GRPO run
whose reward is ONE WorldPM-layout model sharded over the two training processes
(``model_kwargs={"engine": "fsdp"}``). Each rank writes what TRL passed and got back, and the
trainer's log history, to OUT/rank<R>.json.

Usage: accelerate launch --num_processes 2 --cpu trl_sharded_job.py CHECKPOINT OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from wpr_policy import gsm8k_questions, tiny_policy
from wpr_sharded import leave_distributed_job

from worldpm_reward.integrations.trl import WorldPMReward

ckpt, out_dir = sys.argv[1], Path(sys.argv[2])


class RecordingReward(WorldPMReward):
    calls: ClassVar[list] = []

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        out = super().__call__(prompts, completions, completion_ids, **kwargs)
        self.calls.append([list(prompts), list(completions), list(out)])
        return out


policy, tok = tiny_policy()
reward = RecordingReward(ckpt, model_kwargs={"engine": "fsdp"})
args = GRPOConfig(
    output_dir=str(out_dir / "run"),
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=12,
    max_steps=3,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    learning_rate=1e-3,
    save_strategy="no",
)
dataset = Dataset.from_dict({"prompt": gsm8k_questions(16)})
trainer = GRPOTrainer(
    model=policy, processing_class=tok, reward_funcs=[reward], args=args, train_dataset=dataset
)
trainer.train()
scorer = reward._scorer
rank = trainer.accelerator.process_index
report = {
    "rank": rank,
    "world": trainer.accelerator.num_processes,
    "engine": type(scorer.engine).__name__,
    "memory": scorer.engine.memory().__dict__ if hasattr(scorer.engine, "memory") else None,
    "calls": reward.calls,
    "log_history": trainer.state.log_history,
}
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
leave_distributed_job()
