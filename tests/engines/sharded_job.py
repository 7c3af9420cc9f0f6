"""Run by test_sharded.py under torchrun (gloo, CPU): every rank loads the sharded reward model
and scores its own samples through a fixed script of calls, then writes what it got to
OUT/rank<R>.json. The test compares that with the unsharded model in its own process.

Usage: torchrun --nproc_per_node N sharded_job.py CHECKPOINT BROKEN_CHECKPOINT OUT_DIR

The calls (wpr_sharded.calls_for: the same on every rank, each rank with its own samples):
uneven counts, a rank with none, a rank whose samples are all invalid, and a call where one rank's forward fails mid-model on one sample (an injected RuntimeError in its
second decoder layer) while the others keep scoring.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the wpr_* helpers
from wpr_sharded import calls_for, leave_distributed_job, marker_ids

from worldpm_reward import CheckpointError, RewardModel

ckpt, broken, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
report: dict = {"rank": rank, "world": world}

try:  # the same strict check as the other engines, before any collective
    RewardModel.from_pretrained(broken, engine="fsdp", device="cpu")
    report["broken_head"] = "loaded"
except CheckpointError as exc:
    report["broken_head"] = str(exc)

rm = RewardModel.from_pretrained(ckpt, engine="fsdp", device="cpu", max_batch_tokens=96)
mem = rm.engine.memory()
report["memory"] = {
    "resident": mem.resident,
    "total": mem.total,
    "largest_unit": mem.largest_unit,
    "resident_bytes": mem.resident_bytes,
    "full_copy_bytes": mem.full_copy_bytes,
}
report["elements_read"] = rm.engine.elements_read

# failures injected on this rank: a batch holding a marker fails where the marker says
markers = marker_ids(rm.tokenizer)
armed = {"layer": False, "head": False}
backbone = rm.model.model


def arm(module, args):
    ids = args[0]
    armed.update(layer=bool((ids == markers["layer"]).any()), head=bool((ids == markers["head"]).any()))
    if (ids == markers["embedding"]).any():
        raise RuntimeError("injected failure before the embedding's collectives")


def explode(module, args):
    if armed["layer"]:
        raise RuntimeError("injected failure in decoder layer 1")


def explode_head(module, args):
    if armed["head"]:
        raise RuntimeError("injected failure in the head")


backbone.embed_tokens.register_forward_pre_hook(arm)
backbone.layers[1].register_forward_pre_hook(explode)
rm.model.score.register_forward_pre_hook(explode_head)

report["calls"] = []
for samples in calls_for(rank, world):
    start = time.perf_counter()
    results = rm.score_detailed(samples)
    report["calls"].append(
        {
            "scores": [r.score for r in results],
            "errors": [r.error for r in results],
            "seconds": time.perf_counter() - start,
            "local_batches": rm.last_stats.num_batches,
            "global": {
                "num_samples": rm.engine.global_stats.num_samples,
                "num_errors": rm.engine.global_stats.num_errors,
                "num_batches": rm.engine.global_stats.num_batches,
            },
        }
    )
report["dummy_calls"] = rm.engine.dummy_calls
report["memory_after_calls"] = rm.engine.memory().resident  # everything resharded between calls
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
leave_distributed_job()
