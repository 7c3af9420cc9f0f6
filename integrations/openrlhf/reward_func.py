"""OpenRLHF reward-function file for WorldPM: ``--reward.remote_url /path/to/reward_func.py``.

OpenRLHF imports this file in every rollout actor and calls
``reward_func(queries, prompts, labels)`` (one sample per call, from worker threads). It
forwards the call unchanged to a worldpm-reward host, where the policy's chat markup is
parsed and the conversation is scored in WorldPM's own format with cross-request batching:

* ``WORLDPM_REWARD_URL``: comma-separated base URLs of ``worldpm-reward serve`` (load
  balanced, with failover to the next URL on connection errors and 5xx);
* or ``WORLDPM_REWARD_RAY_APP``: the name of the Ray Serve application started by
  ``worldpm-reward-ray`` (called through a deployment handle, inside the Ray cluster).

Optional: ``WORLDPM_REWARD_TOKEN`` (bearer token), ``WORLDPM_REWARD_TIMEOUT`` (seconds,
default 180), ``WORLDPM_REWARD_RETRIES`` (default 5).

Returns ``{"rewards": [...], "scores": [...], "extra_logs": {...}}`` as OpenRLHF expects.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

_lock = threading.Lock()
_client: Any = None
_handle: Any = None
_cycle: Any = None


def _urls() -> list[str]:
    raw = os.environ.get("WORLDPM_REWARD_URL", "")
    urls = [u.strip().rstrip("/").removesuffix("/get_reward") for u in raw.split(",") if u.strip()]
    return urls


def _via_http(payload: dict[str, Any]) -> dict[str, Any]:
    global _client, _cycle
    import httpx

    with _lock:
        if _client is None:
            _client = httpx.Client(timeout=float(os.environ.get("WORLDPM_REWARD_TIMEOUT", "180")))
            _cycle = itertools.cycle(_urls())
    token = os.environ.get("WORLDPM_REWARD_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    retries = int(os.environ.get("WORLDPM_REWARD_RETRIES", "5"))
    last: object = None
    for attempt in range(retries):
        with _lock:
            url = next(_cycle)
        try:
            r = _client.post(f"{url}/get_reward", json=payload, headers=headers)
            if r.status_code < 500:
                r.raise_for_status()  # 4xx (bad item, auth): retrying elsewhere cannot help
                return r.json()
            last = f"{url}: HTTP {r.status_code} {r.text[:200]}"
        except httpx.TransportError as exc:
            last = f"{url}: {exc}"
        time.sleep(min(0.5 * 2**attempt, 8.0))
    raise RuntimeError(f"WorldPM reward servers failed {retries} times; last: {last}")


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
    if not _urls():
        raise RuntimeError(
            "set WORLDPM_REWARD_URL (server URLs) or WORLDPM_REWARD_RAY_APP (Ray Serve app name)"
        )
    return _via_http(payload)
