"""The script of scoring calls test_sharded.py runs on every rank of a sharded reward model
(sharded_job.py) and checks against the unsharded model. Every rank makes the same calls,
each with its own samples: uneven counts, a rank with none, a rank whose samples are all
invalid, and a call where one sample fails inside the model on the last rank."""

from __future__ import annotations

import os
import sys
from typing import Any

#: A sample holding one of these texts fails where it says (sharded_job.py injects it):
#: before the embedding's collectives, in the second decoder layer (between two all-gathers),
#: and in the head (after the last collective).
FAIL_MARKERS = {"embedding": "☔☔☔", "layer": "⚡⚡⚡", "head": "♞♞♞"}


def marker_ids(tokenizer: Any) -> dict[str, int]:
    """One token id per marker that no other marker's encoding holds."""
    ids = {k: set(tokenizer.encode(m, add_special_tokens=False)) for k, m in FAIL_MARKERS.items()}
    return {k: min(v - set().union(*(ids[o] for o in ids if o != k))) for k, v in ids.items()}


def has_marker(sample: Any) -> bool:
    import json

    text = json.dumps(sample, ensure_ascii=False)
    return any(m in text for m in FAIL_MARKERS.values())


INVALID: list[Any] = [
    {"prompt": "a prompt without a response"},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "five"}]},
    {"messages": "not a list"},
]


def conversation(call: int, rank: int, i: int) -> dict[str, Any]:
    """A distinct conversation; lengths vary so ranks plan different numbers of micro-batches."""
    words = " ".join(["step"] * ((7 * i + 3 * rank + call) % 11))
    reply = f"Answer {call}.{rank}.{i}: {words} the result is {i * 37 + rank}."
    if (i + rank) % 4 == 1:
        reply += " Voilà, 结果是对的."  # non-ASCII
    return {
        "messages": [
            {"role": "user", "content": f"Question {i} from rank {rank}, call {call}?"},
            {"role": "assistant", "content": reply},
        ]
    }


def calls_for(rank: int, world: int) -> list[list[Any]]:
    """The samples of each call for ``rank`` (the same number of calls on every rank)."""

    def some(call: int, n: int) -> list[Any]:
        return [conversation(call, rank, i) for i in range(n)]

    last = world - 1
    uneven = some(0, [5, 2, 8][rank % 3] + rank)
    if rank == 1:
        uneven.insert(1, INVALID[0])
    no_samples = [] if rank == 1 else some(1, 6 if rank == 0 else 3)
    all_invalid = list(INVALID) if rank == 1 else ([] if rank == 2 else some(2, 4))
    failing = some(3, 5 if rank != last else 4)
    if rank == last:
        failing[2]["messages"][1]["content"] += " " + FAIL_MARKERS["layer"]
    failing_elsewhere = some(4, 3)
    if rank == 0:
        failing_elsewhere[1]["messages"][1]["content"] += " " + FAIL_MARKERS["embedding"]
    if rank == last:
        failing_elsewhere[0]["messages"][1]["content"] += " " + FAIL_MARKERS["head"]
    return [uneven, no_samples, all_invalid, failing, failing_elsewhere]


def leave_distributed_job() -> None:
    """End a job's process after its report is written: destroy the process group and exit
    without interpreter finalization.

    torch 2.13's gloo worker thread drops a finished collective's tensors after the caller's
    wait has returned, and that takes the GIL. When the main thread is finalizing by then, the
    worker's thread exit unwinds through a noexcept destructor and the process aborts
    ("terminate called without an active exception"; about 1 run in 20 on 2 cores; a core dump
    shows ProcessGroupGloo::AsyncWork::~AsyncWork -> take_gil -> pthread_exit; see
    pytorch/pytorch PR 179291). Everything the test checks is written before this; the exit
    code is what the launcher reports."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
