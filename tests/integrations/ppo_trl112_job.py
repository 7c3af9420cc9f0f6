"""Run by test_trl_ppo.py in a subprocess whose path puts trl 1.12.0 first (PPOTrainer was
removed in trl 1.13). Usage: python ppo_trl112_job.py CHECKPOINT OUTPUT.json"""

from __future__ import annotations

import copy
import json
import sys
import tempfile

import torch
import trl
from datasets import Dataset
from transformers import LlamaForSequenceClassification
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.utils import get_reward
from wpr_policy import gsm8k_questions, tiny_policy

from worldpm_reward import RewardModel
from worldpm_reward.integrations.trl_ppo import WorldPMPPORewardModel

ckpt, out_path = sys.argv[1], sys.argv[2]
policy, tok = tiny_policy(fmt="chatml")
ref_policy, _ = tiny_policy(fmt="chatml")
direct = RewardModel.from_pretrained(ckpt, device="cpu")
rm = WorldPMPPORewardModel(tok, ckpt, model_kwargs={"device": "cpu"})

# 1. TRL's own get_reward on known conversations, left-padded queries + right-padded replies
convs = [
    [
        {"role": "user", "content": "Tips for better sleep?"},
        {"role": "assistant", "content": "Keep a schedule."},
    ],
    [
        {"role": "user", "content": "What is 7 x 6?"},
        {"role": "assistant", "content": "It is 42, since 7 x 6 = 42."},
    ],
    [{"role": "user", "content": "Say hi in French."}, {"role": "assistant", "content": "Bonjour !"}],
]
pad = tok.pad_token_id
queries = [tok.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True) for c in convs]
queries = [q["input_ids"] if isinstance(q, dict) or hasattr(q, "keys") else q for q in queries]
replies = [tok(c[1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in convs]
qlen, rlen = max(map(len, queries)), max(map(len, replies)) + 2
rows = [[pad] * (qlen - len(q)) + q + r + [pad] * (rlen - len(r)) for q, r in zip(queries, replies)]
_, scores, _ = get_reward(rm, torch.tensor(rows), pad, qlen)
want = direct.score(convs)
get_reward_diff = max(abs(a - b) for a, b in zip(scores.tolist(), want))

# 2. a few real PPO updates with the module as the reward model
recorded: list[tuple[list, float]] = []
original = rm.score_texts


def recording(texts):
    rewards = original(texts)
    recorded.extend(zip(rm.last_conversations, rewards))
    return rewards


rm.score_texts = recording  # type: ignore[method-assign]
rm.backbone._score_texts = recording
prompts = [
    tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    for q in gsm8k_questions(16)
]
prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
dataset = Dataset.from_dict({"input_ids": prompts})
value_config = copy.deepcopy(policy.config)  # the critic: the policy's shape with one output
value_config.num_labels = 1
value = LlamaForSequenceClassification(value_config)
args = PPOConfig(
    output_dir=tempfile.mkdtemp(),
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    total_episodes=12,
    num_ppo_epochs=1,
    num_mini_batches=1,
    response_length=10,
    stop_token="eos",
    report_to="none",
    use_cpu=True,
    local_rollout_forward_batch_size=4,
    save_strategy="no",
    num_sample_generations=0,
    missing_eos_penalty=None,
    learning_rate=1e-3,
)
trainer = PPOTrainer(
    args=args,
    processing_class=tok,
    model=policy,
    ref_model=ref_policy,
    reward_model=rm,
    train_dataset=dataset,
    value_model=value,
)
trainer.train()
convs_seen = [c for c, _ in recorded]
redo = direct.score_detailed(convs_seen)
ppo_diff = max(abs(r.score - v) for r, (_, v) in zip(redo, recorded))
report = {
    "trl": trl.__version__,
    "get_reward_diff": get_reward_diff,
    "get_reward_scores": scores.tolist(),
    "want": want,
    "updates": trainer.state.global_step,
    "scored": len(recorded),
    "ppo_diff": ppo_diff,
    "example": recorded[0][0] if recorded else None,
}
with open(out_path, "w") as f:
    json.dump(report, f)
