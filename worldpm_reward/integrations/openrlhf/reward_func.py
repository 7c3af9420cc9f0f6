"""OpenRLHF reward-function file for WorldPM: ``--reward.remote_url /path/to/reward_func.py``.

OpenRLHF imports this file in every rollout actor and calls
``reward_func(queries, prompts, labels)`` (one sample per call, from worker threads). It
forwards the call unchanged to a worldpm-reward host, where the policy's chat markup is
parsed and the conversation is scored in WorldPM's own format with cross-request batching:

* ``WORLDPM_REWARD_URL``: comma-separated base URLs of ``worldpm-reward serve`` (load
  balanced, with the package's one retry/failover loop: ``RemoteScorer``);
* or ``WORLDPM_REWARD_RAY_APP``: the name of the Ray Serve application started by
  ``worldpm-reward-ray`` (called through a deployment handle, inside the Ray cluster).

Optional: ``WORLDPM_REWARD_TOKEN`` (bearer token), ``WORLDPM_REWARD_TIMEOUT`` (seconds,
default 180), ``WORLDPM_REWARD_RETRIES`` (attempts, default 5), ``WORLDPM_REWARD_FALLBACK``
(default -10, the low end of OpenRLHF's default ``--reward.clip_range``).

Failures never hand OpenRLHF a None (which breaks its step later): the server answers an
unscorable item with its fallback reward (``worldpm-reward serve --fallback-reward``, -10 by
default), and when the server itself cannot be reached after the retries, this file returns
``WORLDPM_REWARD_FALLBACK`` for the sample, ``worldpm_failed: 1`` in ``extra_logs`` and an
ERROR in the actor's log. ``WORLDPM_REWARD_FALLBACK=raise`` lets the error reach OpenRLHF.

Returns ``{"rewards": [...], "scores": [...], "extra_logs": {...}}`` as OpenRLHF expects.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger("worldpm_reward.integrations.openrlhf.reward_func")

_lock = threading.Lock()
_scorer: Any = None
_handle: Any = None


def _remote() -> Any:
    """One RemoteScorer per process: the package's retry/failover loop, over /get_reward."""
    global _scorer
    from worldpm_reward.serving.client import RemoteScorer

    with _lock:
        if _scorer is None:
            _scorer = RemoteScorer(
                os.environ["WORLDPM_REWARD_URL"],
                token=os.environ.get("WORLDPM_REWARD_TOKEN"),
                timeout_s=float(os.environ.get("WORLDPM_REWARD_TIMEOUT", "180")),
                retries=max(0, int(os.environ.get("WORLDPM_REWARD_RETRIES", "5")) - 1),
            )
        return _scorer


def _via_ray(app: str, payload: dict[str, Any]) -> dict[str, Any]:
    global _handle
    from ray import serve

    with _lock:
        if _handle is None:
            _handle = serve.get_app_handle(app)
    return _handle.get_reward.remote(payload["query"], payload["prompts"], payload["labels"]).result()


def reward_func(queries: list[str], prompts: list[str], labels: list[Any]) -> dict[str, Any]:
    """OpenRLHF's reward-function contract (see the module docstring)."""
    payload = {"query": list(queries), "prompts": list(prompts), "labels": list(labels)}
    app = os.environ.get("WORLDPM_REWARD_RAY_APP")
    if app:
        return _via_ray(app, payload)
    if not os.environ.get("WORLDPM_REWARD_URL", "").strip():
        raise RuntimeError(
            "set WORLDPM_REWARD_URL (server URLs) or WORLDPM_REWARD_RAY_APP (Ray Serve app name)"
        )
    fallback = os.environ.get("WORLDPM_REWARD_FALLBACK", "-10").strip()
    if fallback == "raise":
        return _remote().get_reward(payload["query"], payload["prompts"], payload["labels"])
    value = float(fallback)
    try:
        return _remote().get_reward(payload["query"], payload["prompts"], payload["labels"])
    except Exception as exc:  # every server unreachable or refusing: a low reward, not a None
        logger.error(
            "worldpm-reward: %d sample(s) not scored, reward %s (WORLDPM_REWARD_FALLBACK): %s",
            len(payload["query"]),
            value,
            exc,
        )
        n = len(payload["query"])
        return {
            "rewards": [value] * n,
            "scores": [value] * n,
            "extra_logs": {"worldpm_failed": [1.0] * n},
        }
