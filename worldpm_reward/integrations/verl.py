"""veRL custom reward functions backed by worldpm-reward (POLAR or WorldPM).

veRL config::

    custom_reward_function:
      path: /path/to/site-packages/worldpm_reward/integrations/verl.py   # worldpm-reward verl-file
      name: compute_score_batch
    reward_model:
      reward_manager: batch

``compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos)`` follows
POLAR's own veRL recipe: the prompt is ``extra_info["prompt"]`` (a string or a message
list), the reference answer is ``ground_truth`` (used by POLAR, and by WorldPM only with
reference-relative shaping), the policy's output is ``solution_str``. Returns one float per
sample. A sample that cannot be scored raises an error naming it (veRL takes no None).

Where the scores come from (environment variables, read on first call):
  * ``WORLDPM_REWARD_URL``: comma-separated ``worldpm-reward serve`` URLs (recommended:
    the reward model on its own GPUs), with ``WORLDPM_REWARD_TOKEN``;
  * or ``WORLDPM_REWARD_MODEL``: a checkpoint scored in this process
    (``WORLDPM_REWARD_DEVICE``, default cuda if available);
  * ``WORLDPM_REWARD_SHAPING``: optional JSON of ShapingConfig fields.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from worldpm_reward.rewards import RewardFunction
from worldpm_reward.shaping import ShapingConfig

__all__ = ["compute_score", "compute_score_batch", "verl_samples"]

_lock = threading.Lock()
_reward: RewardFunction | None = None


def _reward_fn() -> RewardFunction:
    global _reward
    with _lock:
        if _reward is None:
            shaping = ShapingConfig(**json.loads(os.environ.get("WORLDPM_REWARD_SHAPING", "{}")))
            url, model = os.environ.get("WORLDPM_REWARD_URL"), os.environ.get("WORLDPM_REWARD_MODEL")
            if url:
                from worldpm_reward.serving.client import RemoteScorer

                scorer: Any = RemoteScorer(url, token=os.environ.get("WORLDPM_REWARD_TOKEN"))
            elif model:
                from worldpm_reward.scoring import RewardModel

                scorer = RewardModel.from_pretrained(model, device=os.environ.get("WORLDPM_REWARD_DEVICE"))
            else:
                raise RuntimeError(
                    "set WORLDPM_REWARD_URL (reward servers) or WORLDPM_REWARD_MODEL (a checkpoint)"
                )
            _reward = RewardFunction(scorer, shaping)
        return _reward


def verl_samples(
    solution_strs: Sequence[str], ground_truths: Sequence[Any], extra_infos: Sequence[Any]
) -> list[dict[str, Any]]:
    samples = []
    for i, (solution, truth, info) in enumerate(zip(solution_strs, ground_truths, extra_infos)):
        prompt = (info or {}).get("prompt") if isinstance(info, dict) else None
        if prompt is None:
            raise ValueError(
                f"sample {i}, field 'extra_info.prompt': missing; put the prompt in extra_info['prompt']"
            )
        sample: dict[str, Any] = {"prompt": prompt, "response": solution}
        if isinstance(truth, str) and truth.strip():
            sample["reference"] = truth
        samples.append(sample)
    return samples


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any],
    **kwargs: Any,
) -> list[float]:
    """veRL's batched reward function (see the module docstring)."""
    batch = _reward_fn()(verl_samples(solution_strs, ground_truths, extra_infos))
    if batch.errors:
        shown = "; ".join(e for _, e in batch.errors[:3])
        raise ValueError(f"{len(batch.errors)} of {len(solution_strs)} samples cannot be scored: {shown}")
    return [float(r) for r in batch.rewards if r is not None]


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """veRL's per-sample form."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info])[0]
