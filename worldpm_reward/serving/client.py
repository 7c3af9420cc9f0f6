"""Client of ``worldpm-reward serve``, sync and async, on httpx.

:class:`RemoteScorer` implements the same scorer seam as the in-process RewardModel
(``score_detailed``), so every adapter can score remotely, and also speaks OpenRLHF's
``/get_reward`` (:meth:`RemoteScorer.get_reward`, used by the OpenRLHF reward-function file).
It splits large batches into chunks, spreads chunks over several endpoints (round robin),
retries a failed chunk with exponential backoff on the next healthy endpoint (failover),
and reassembles results by position: results are never reordered, dropped or duplicated.
Scores are the server's RAW scores (``score``); shaping is left to the caller.

There is ONE retry/failover policy, :meth:`RemoteScorer._attempts`: a generator that says
where to send each attempt and how long to wait, and judges each answer. The sync and the
async drivers only do the I/O it asks for, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from worldpm_reward.errors import RemoteScoringError, require_extra
from worldpm_reward.samples import Sample, ScoreResult

logger = logging.getLogger(__name__)

#: HTTP statuses worth retrying on another endpoint (overload, restarts, gateways).
RETRYABLE = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class _Send:
    """An attempt: POST ``payload`` to ``url``."""

    url: str


@dataclass(frozen=True)
class _Wait:
    """Sleep this many seconds before the next attempt."""

    seconds: float


#: What the I/O driver sends back into the policy: the httpx response, or the transport error.
_Outcome = Any


def _body(payload: dict[str, Any]) -> bytes:
    """JSON with non-ASCII escaped: a lone surrogate in one sample travels as ``\\ud800`` and
    comes back as that sample's error, instead of failing the whole request here."""
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


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

    # -- the one retry / failover policy -----------------------------------------------
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
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), 8.0)

    def _attempts(self, path: str) -> Generator[_Send | _Wait, _Outcome, Any]:
        """The retry/failover loop, without I/O. Yields :class:`_Send` (the driver POSTs
        and sends back the response or the transport exception) and :class:`_Wait`; returns
        the JSON body of the first good answer. A retryable status or a transport error
        marks the endpoint down and moves on; any other non-200 answer cannot be fixed by
        a retry and raises at once."""
        last: object = None
        for attempt in range(self.retries + 1):
            url = self._pick(attempt)
            outcome = yield _Send(url)
            if isinstance(outcome, BaseException):
                last = outcome
                self._mark_down(url, outcome)
            elif outcome.status_code in RETRYABLE:
                last = f"HTTP {outcome.status_code}: {outcome.text[:200]}"
                self._mark_down(url, last)
            elif outcome.status_code != 200:
                raise RemoteScoringError(
                    f"{url}{path} answered HTTP {outcome.status_code}: {outcome.text[:500]}"
                )
            else:
                return outcome.json()
            if attempt < self.retries:
                yield _Wait(self._delay(attempt))
        raise RemoteScoringError(f"all reward servers failed after {self.retries + 1} attempts: {last}")

    # -- drivers: the same policy, sync and async I/O ------------------------------------
    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        httpx = require_extra("httpx", "client")
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        policy = self._attempts(path)
        step = next(policy)
        while True:
            if isinstance(step, _Wait):
                time.sleep(step.seconds)
                outcome: _Outcome = None
            else:
                try:
                    outcome = self._client.post(
                        f"{step.url}{path}", content=_body(payload), headers=self._headers()
                    )
                except httpx.TransportError as exc:
                    outcome = exc
            try:
                step = policy.send(outcome)
            except StopIteration as done:
                return done.value

    async def _apost(self, client: Any, path: str, payload: dict[str, Any]) -> Any:
        httpx = require_extra("httpx", "client")
        policy = self._attempts(path)
        step = next(policy)
        while True:
            if isinstance(step, _Wait):
                await asyncio.sleep(step.seconds)
                outcome: _Outcome = None
            else:
                try:
                    outcome = await client.post(
                        f"{step.url}{path}", content=_body(payload), headers=self._headers()
                    )
                except httpx.TransportError as exc:
                    outcome = exc
            try:
                step = policy.send(outcome)
            except StopIteration as done:
                return done.value

    # -- /v1/score --------------------------------------------------------------------
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

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        out: list[ScoreResult] = []
        for chunk in self._chunks(samples):
            out.extend(self._results(self._post("/v1/score", {"samples": chunk}), len(chunk)))
        return out

    async def ascore_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        """Async form: chunks are sent concurrently, results reassembled in order."""
        httpx = require_extra("httpx", "client")
        chunks = self._chunks(samples)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            bodies = await asyncio.gather(*(self._apost(client, "/v1/score", {"samples": c}) for c in chunks))
        return [r for body, c in zip(bodies, chunks) for r in self._results(body, len(c))]

    # -- /get_reward (OpenRLHF's protocol) ----------------------------------------------
    def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """OpenRLHF's remote-reward call: ``{"rewards", "scores", "extra_logs"}`` for
        policy-rendered ``queries``; a 4xx answer (a bad item, auth) raises at once."""
        payload = {
            "query": list(queries),
            "prompts": None if prompts is None else list(prompts),
            "labels": None if labels is None else list(labels),
        }
        body = self._post("/get_reward", payload)
        if not isinstance(body, dict) or not isinstance(body.get("rewards"), list):
            raise RemoteScoringError(f"/get_reward answered without a 'rewards' list: {str(body)[:200]}")
        return body

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
