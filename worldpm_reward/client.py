"""Client of ``worldpm-reward serve`` (the native /v1/score API), sync and async, on httpx.

:class:`RemoteScorer` implements the same scorer seam as the in-process RewardModel
(``score_detailed``), so every adapter can score remotely. It splits large batches into
chunks, spreads chunks over several endpoints (round robin), retries a failed chunk with
exponential backoff on the next healthy endpoint (failover), and reassembles results by
position: results are never reordered, dropped or duplicated. Scores are the server's
RAW scores (``score``); shaping is left to the caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from worldpm_reward.errors import WorldPMRewardError, require_extra
from worldpm_reward.samples import Sample, ScoreResult

logger = logging.getLogger(__name__)

#: HTTP statuses worth retrying on another endpoint (overload, restarts, gateways).
RETRYABLE = {408, 429, 500, 502, 503, 504}


class RemoteScoringError(WorldPMRewardError):
    """Every endpoint failed for a chunk after all retries."""


def _payload_sample(sample: Any) -> Any:
    if isinstance(sample, Sample):
        out: dict[str, Any] = {"messages": sample.messages}
        if sample.reference is not None:
            out["reference"] = sample.reference
        return out
    return sample


class RemoteScorer:
    """Score samples on one or more reward servers.

    Args:
        urls: base URL(s), e.g. "http://10.0.0.5:8000" (a trailing "/v1/score" or
            "/get_reward" is accepted and stripped), or a comma-separated string.
        token: bearer token (the server's WORLDPM_REWARD_TOKEN).
        timeout_s: per-request timeout in seconds.
        retries: extra attempts per chunk after the first, each on the next endpoint.
        backoff_s: first retry delay in seconds; doubles each retry (capped at 8 s).
        max_chunk: most samples per request.
        cooldown_s: how long a failed endpoint is skipped before it is tried again.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 180.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_chunk: int = 256,
        cooldown_s: float = 5.0,
    ) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("RemoteScorer needs at least one server URL")
        self.urls = [self._base(u) for u in urls]
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_chunk = max_chunk
        self.cooldown_s = cooldown_s
        self._down_until: dict[str, float] = {}
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._client: Any = None

    @staticmethod
    def _base(url: str) -> str:
        url = url.strip().rstrip("/")
        for suffix in ("/v1/score", "/get_reward"):
            url = url.removesuffix(suffix)
        return url

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _lock=None, _rr=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._rr = itertools.count()

    # -- endpoint choice -------------------------------------------------------------
    def _pick(self, attempt: int) -> str:
        with self._lock:
            start = next(self._rr)
        now = time.monotonic()
        order = [self.urls[(start + attempt + k) % len(self.urls)] for k in range(len(self.urls))]
        healthy = [u for u in order if self._down_until.get(u, 0.0) <= now]
        return (healthy or order)[0]

    def _mark_down(self, url: str, why: object) -> None:
        logger.warning("reward server %s failed (%s); skipping it for %.0f s", url, why, self.cooldown_s)
        self._down_until[url] = time.monotonic() + self.cooldown_s

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _chunks(self, samples: Sequence[Any]) -> list[list[Any]]:
        items = [_payload_sample(s) for s in samples]
        return [items[i : i + self.max_chunk] for i in range(0, len(items), self.max_chunk)]

    @staticmethod
    def _results(body: dict[str, Any], expected: int) -> list[ScoreResult]:
        results = body.get("results")
        if not isinstance(results, list) or len(results) != expected:
            raise RemoteScoringError(f"server answered {len(results or [])} results for {expected} samples")
        return [
            ScoreResult(
                score=r.get("score"),
                num_tokens=int(r.get("num_tokens") or 0),
                truncated=bool(r.get("truncated")),
                response_truncated=bool(r.get("response_truncated")),
                error=r.get("error"),
                extras={"reward": r.get("reward")},
            )
            for r in results
        ]

    def _accept(self, url: str, r: Any, expected: int) -> tuple[list[ScoreResult] | None, object]:
        """(results, None) for a good answer; (None, reason) for one worth retrying elsewhere
        (the endpoint is marked down); raises for an answer no retry can fix (4xx)."""
        if r.status_code in RETRYABLE:
            reason = f"HTTP {r.status_code}: {r.text[:200]}"
            self._mark_down(url, reason)
            return None, reason
        if r.status_code != 200:
            raise RemoteScoringError(f"{url}/v1/score answered HTTP {r.status_code}: {r.text[:500]}")
        return self._results(r.json(), expected), None

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), 8.0)

    # -- sync ------------------------------------------------------------------------
    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        httpx = require_extra("httpx", "client")
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        out: list[ScoreResult] = []
        for chunk in self._chunks(samples):
            out.extend(self._score_chunk(chunk))
        return out

    def _score_chunk(self, chunk: list[Any]) -> list[ScoreResult]:
        httpx = require_extra("httpx", "client")
        last: object = None
        for attempt in range(self.retries + 1):
            url = self._pick(attempt)
            try:
                r = self._client.post(f"{url}/v1/score", json={"samples": chunk}, headers=self._headers())
                results, last = self._accept(url, r, len(chunk))
                if results is not None:
                    return results
            except httpx.TransportError as exc:
                last = exc
                self._mark_down(url, exc)
            if attempt < self.retries:
                time.sleep(self._delay(attempt))
        raise RemoteScoringError(f"all reward servers failed after {self.retries + 1} attempts: {last}")

    # -- async -----------------------------------------------------------------------
    async def ascore_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        """Async form: chunks are sent concurrently, results reassembled in order."""
        httpx = require_extra("httpx", "client")
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            parts = await asyncio.gather(*(self._ascore_chunk(client, c) for c in self._chunks(samples)))
        return [r for part in parts for r in part]

    async def _ascore_chunk(self, client: Any, chunk: list[Any]) -> list[ScoreResult]:
        httpx = require_extra("httpx", "client")
        last: object = None
        for attempt in range(self.retries + 1):
            url = self._pick(attempt)
            try:
                r = await client.post(f"{url}/v1/score", json={"samples": chunk}, headers=self._headers())
                results, last = self._accept(url, r, len(chunk))
                if results is not None:
                    return results
            except httpx.TransportError as exc:
                last = exc
                self._mark_down(url, exc)
            if attempt < self.retries:
                await asyncio.sleep(self._delay(attempt))
        raise RemoteScoringError(f"all reward servers failed after {self.retries + 1} attempts: {last}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
