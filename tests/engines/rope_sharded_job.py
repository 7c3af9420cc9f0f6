"""Run by test_sharded.py under torchrun (gloo, CPU): a sharded reward model whose RoPE scales
with the call's longest position (dynamic NTK) scores this rank's samples in one call, again in
reverse order, and through ``forward_ids``; the scores go to OUT/rank<R>.json.

Usage: torchrun --nproc_per_node N rope_sharded_job.py CHECKPOINT SAMPLES_JSON MAX_LENGTH OUT_DIR
(SAMPLES_JSON: one list of samples per rank)
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the wpr_* helpers
from wpr_sharded import leave_distributed_job

from worldpm_reward import RewardModel
from worldpm_reward.samples import parse_sample

ckpt, samples_json, max_length, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank = dist.get_rank()
samples = json.loads(Path(samples_json).read_text())[rank]

# any padding allowed (the CPU default of 5% keeps samples of very different lengths apart)
rm = RewardModel.from_pretrained(
    ckpt, engine="fsdp", device="cpu", max_length=max_length, max_padding_fraction=1.0
)
ids = [rm.encoder.encode(parse_sample(s)).input_ids for s in samples]  # type: ignore[union-attr]
report = {"one_at_a_time": rm.engine.one_at_a_time, "lengths": [len(x) for x in ids]}
report["scores"] = rm.score(samples)
report["batches"] = rm.last_stats.num_batches
report["reversed"] = rm.score(samples[::-1])[::-1]  # after the longest: nothing carried over
report["forward_ids"] = rm.forward_ids(ids)
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
leave_distributed_job()
