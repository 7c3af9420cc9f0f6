"""Client of ``worldpm-reward serve``, sync and async, on httpx.

:class:`RemoteScorer` implements the same scorer seam as the in-process RewardModel
(``score_detailed``), so every adapter can score remotely, and also speaks OpenRLHF's
``/get_reward`` (:meth:`RemoteScorer.get_reward`, used by the OpenRLHF reward-function file).
It splits large batches into chunks and reassembles results by position: results are never
reordered, dropped or duplicated. Scores are the server's RAW scores (``score``); shaping is
left to the caller.

Against flaky or hung replicas (an RL run must not stall on one):
  * every attempt has its own timeout (``timeout_s``); the whole call has a deadline (``deadline_s``);
  * a chunk that has not been answered after the *hedge delay* is also sent to another healthy
    replica, and the first good answer wins (``hedge``): derived from observed latency (2x the
    95th percentile of recent answers, at least ``hedge_min_s``), or a fixed number of seconds;
  * failed replicas are skipped (circuit breaking) and, with several URLs, probed in the
    background (``GET /health`` every ``health_interval_s``), so a hung replica leaves the
    rotation within one probe. A replica whose request timed out, lost a hedge race or
    answered nonsense is *suspect*: a 200 from ``/health`` alone does not bring it back; after
    its cooldown (doubling up to 60 s) it gets one real request at a time (hedged as usual),
    and only a good answer to it clears it;
  * every 200 is validated (JSON, one result per sample, finite scores or null with an
    error); a bad one counts as that replica's failure and the chunk is retried elsewhere,
    and a fast wrong answer never marks a slower good replica down;
  * the sync API runs on the same async I/O as the async one (one event-loop thread per
    client): an attempt that is no longer needed is cancelled and its connection closed, so
    a hung replica cannot hold threads or connections, and no pool can be exhausted;
  * ``Retry-After`` on 429/503 is honoured: that replica is not asked again before it says;
  * every chunk carries one ``X-Request-ID`` for all of its retries and hedges, so a server
    that has already answered it returns the same answer without scoring (or counting) it again.

There is ONE retry/hedge policy, :meth:`RemoteScorer._attempts`: a generator that says where
to send each attempt and how long to wait, and judges each answer. The sync and the async
drivers only do the I/O it asks for, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from worldpm_reward.errors import ConfigError, RemoteScoringError, require_extra
from worldpm_reward.samples import Sample, ScoreResult

logger = logging.getLogger(__name__)

#: HTTP statuses worth retrying on another endpoint (overload, restarts, gateways).
RETRYABLE = {408, 429, 500, 502, 503, 504}
#: The header that makes retries and hedges of one chunk idempotent on the server.
REQUEST_ID_HEADER = "X-Request-ID"


@dataclass(frozen=True)
class _Send:
    """Start attempt ``attempt``: POST to ``url`` with this per-attempt timeout (seconds)."""

    attempt: int
    url: str
    timeout: float


@dataclass(frozen=True)
class _Wait:
    """Wait up to ``seconds`` for an attempt in flight to finish (just sleep if none is).
    The driver sends back ``(attempt, outcome)`` (the httpx response, or the transport
    error) for the first one that finished, or None if none did in time."""

    seconds: float


#: What the I/O driver sends back into the policy.
_Outcome = Any


class _BadAnswer(Exception):
    """A 200 whose body is not a valid answer to the request."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_body(path: str, payload: dict[str, Any], body: Any) -> None:
    """Raise _BadAnswer unless ``body`` is a well-formed answer to ``payload`` on ``path``."""
    if not isinstance(body, dict):
        raise _BadAnswer(f"expected a JSON object, got {type(body).__name__}")
    if path == "/v1/score":
        expected = len(payload.get("samples") or [])
        results = body.get("results")
        if not isinstance(results, list) or len(results) != expected:
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise _BadAnswer(f"{got} results for {expected} samples")
        for i, r in enumerate(results):
            if not isinstance(r, dict):
                raise _BadAnswer(f"result {i} is {type(r).__name__}, not an object")
            score, error = r.get("score"), r.get("error")
            if error is not None and not isinstance(error, str):
                raise _BadAnswer(f"result {i}: error is {type(error).__name__}")
            if score is None and not error:
                raise _BadAnswer(f"result {i}: a null score without an error")
            if score is not None and not _finite(score):
                raise _BadAnswer(f"result {i}: score {str(score)[:40]!r} is not a finite number")
            tokens = r.get("num_tokens", 0)
            if tokens is not None and (not _finite(tokens) or tokens < 0):
                raise _BadAnswer(f"result {i}: num_tokens {str(tokens)[:40]!r}")
    elif path == "/get_reward":
        expected = len(payload.get("query") or [])
        for key in ("rewards", "scores"):
            values = body.get(key)
            if key == "scores" and values is None:
                continue
            if not isinstance(values, list) or len(values) != expected:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise _BadAnswer(f"'{key}': {got} values for {expected} queries")
            bad = [v for v in values if not _finite(v)]
            if bad:
                raise _BadAnswer(f"'{key}' holds {str(bad[0])[:40]!r}, not a finite number")


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


def _client_id() -> str:
    """Sent as ``X-Client-ID``: the server schedules clients fairly (round-robin) by it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_after_seconds(response: Any, cap: float = 60.0) -> float:
    """The delay a ``Retry-After`` header asks for (delta-seconds form), capped; 0 if absent."""
    value = (getattr(response, "headers", None) or {}).get("retry-after")
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), cap) if math.isfinite(seconds) else 0.0


class RemoteScorer:
    """Score samples on one or more reward servers.

    Args:
        urls: base URL(s), e.g. "http://10.0.0.5:8000" (a trailing "/v1/score" or
            "/get_reward" is accepted and stripped), or a comma-separated string.
        token: bearer token (the server's WORLDPM_REWARD_TOKEN).
        timeout_s: timeout of one attempt, in seconds.
        deadline_s: the most one chunk may take over all its attempts, in seconds.
        retries: extra attempts per chunk after the first (hedges not counted).
        backoff_s: first retry delay in seconds; doubles each retry (capped at 8 s).
        max_chunk: most samples per request.
        cooldown_s: how long a failed endpoint is skipped before it is tried again
            (the background health probe brings it back sooner, or keeps it out).
        hedge: "auto" (hedge after 2x the p95 of recent latencies), a number of seconds, or
            None (never hedge). Hedging needs at least two URLs.
        hedge_min_s: the shortest automatic hedge delay.
        hedge_initial_s: the hedge delay before enough latencies were observed.
        health_interval_s: seconds between background ``/health`` probes of every URL
            (only with two or more URLs; 0 turns the probes off).
        health_timeout_s: a probe slower than this marks the replica down.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 180.0,
        deadline_s: float = 600.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_chunk: int = 256,
        cooldown_s: float = 5.0,
        hedge: str | float | None = "auto",
        hedge_min_s: float = 0.1,
        hedge_initial_s: float = 2.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ConfigError("RemoteScorer needs at least one server URL")
        if hedge is not None and hedge != "auto" and not (isinstance(hedge, (int, float)) and hedge >= 0):
            raise ConfigError(f"hedge must be 'auto', a number of seconds >= 0, or None; got {hedge!r}")
        self.urls = [self._base(u) for u in urls]
        if token is not None and token != token.strip():
            logger.warning(
                "the bearer token has surrounding whitespace (e.g. a trailing newline); it is stripped"
            )
            token = token.strip()
        self.token = token or None
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_chunk = max_chunk
        self.cooldown_s = cooldown_s
        self.hedge = hedge
        self.hedge_min_s = hedge_min_s
        self.hedge_initial_s = hedge_initial_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.stats = {"attempts": 0, "hedges": 0, "hedge_wins": 0, "retries": 0, "probes_failed": 0}
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._down_until: dict[str, float] = {}  # circuit breaker: skipped until then
        self._not_before: dict[str, float] = {}  # Retry-After: not asked before then
        self._suspect: dict[str, float] = {}  # url -> its cooldown; back only by a real answer
        self._trials: set[str] = set()  # suspect replicas with a trial request in flight
        self._latencies: deque[float] = deque(maxlen=64)
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._io: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._aclient: Any = None
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()

    @staticmethod
    def _base(url: str) -> str:
        url = url.strip().rstrip("/")
        for suffix in ("/v1/score", "/get_reward"):
            url = url.removesuffix(suffix)
        return url

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # settings + stats

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- replica health ------------------------------------------------------------------
    def _available(self, url: str, now: float) -> bool:
        return (
            self._down_until.get(url, 0.0) <= now
            and self._not_before.get(url, 0.0) <= now
            and not (url in self._suspect and url in self._trials)  # one trial at a time
        )

    def _pick(self, exclude: set[str], now: float) -> str | None:
        """The next replica in round-robin order: a healthy one, else (exclude empty) the one
        that recovers first. None: no healthy replica outside ``exclude``."""
        with self._lock:
            start = next(self._rr)
        order = [self.urls[(start + k) % len(self.urls)] for k in range(len(self.urls))]
        healthy = [u for u in order if u not in exclude and self._available(u, now)]
        if healthy:
            return healthy[0]
        if exclude:
            return None
        return min(order, key=lambda u: max(self._down_until.get(u, 0.0), self._not_before.get(u, 0.0)))

    def _mark_down(self, url: str, why: object, seconds: float | None = None) -> None:
        seconds = self.cooldown_s if seconds is None else seconds
        logger.warning("reward server %s failed (%s); skipping it for %.1f s", url, why, seconds)
        self._down_until[url] = max(self._down_until.get(url, 0.0), time.monotonic() + seconds)

    def _mark_up(self, url: str) -> None:
        self._down_until.pop(url, None)

    def _mark_suspect(self, url: str, why: object) -> None:
        """Out of rotation until a real request to it is answered well (not just /health)."""
        cooldown = min(60.0, max(self.cooldown_s, 2 * self._suspect.get(url, self.cooldown_s / 2)))
        self._suspect[url] = cooldown
        self._mark_down(url, why, cooldown)

    def _probe_loop(self) -> None:
        """Active health checks: every replica's /health, every ``health_interval_s``."""
        httpx = require_extra("httpx", "client")
        with httpx.Client(timeout=self.health_timeout_s) as client:
            while not self._closed.wait(self.health_interval_s):
                for url in self.urls:
                    try:
                        ok = client.get(f"{url}/health").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        if url not in self._suspect:  # a suspect needs a real answer
                            self._mark_up(url)
                    else:
                        self.stats["probes_failed"] += 1
                        self._down_until[url] = (
                            time.monotonic() + 2 * self.health_interval_s + self.health_timeout_s
                        )

    def _start_prober(self) -> None:
        if self._prober is None and len(self.urls) > 1 and self.health_interval_s > 0:
            with self._lock:
                if self._prober is None:
                    self._prober = threading.Thread(
                        target=self._probe_loop, name="worldpm-health", daemon=True
                    )
                    self._prober.start()

    # -- the one retry / hedge policy ----------------------------------------------------
    def hedge_delay(self) -> float | None:
        """Seconds after which an unanswered chunk is also sent to another replica (None: never)."""
        if self.hedge is None or len(self.urls) < 2:
            return None
        if self.hedge != "auto":
            return float(self.hedge)
        if len(self._latencies) < 8:
            return self.hedge_initial_s
        ordered = sorted(self._latencies)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return max(self.hedge_min_s, 2.0 * p95)

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            REQUEST_ID_HEADER: request_id,
            "X-Client-ID": _client_id(),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), 8.0)

    def _attempts(
        self, path: str, payload: dict[str, Any] | None = None
    ) -> Generator[_Send | _Wait, _Outcome, Any]:
        """The retry/hedge loop, without I/O. Yields :class:`_Send` (the driver starts that
        attempt) and :class:`_Wait` (the driver sends back the first finished attempt, or
        None); returns the JSON body of the first good answer (checked against ``payload``).
        A retryable status, a transport error or a bad 200 marks that replica down (for its
        ``Retry-After`` if it sent one) and the chunk moves on; any other non-200 answer
        cannot be fixed by a retry and raises."""
        inflight: dict[int, tuple[str, float]] = {}
        try:
            return (yield from self._policy(path, inflight, payload))
        finally:
            for url, _ in inflight.values():
                self._trials.discard(url)

    def _policy(
        self, path: str, inflight: dict[int, tuple[str, float]], payload: dict[str, Any] | None
    ) -> Generator[_Send | _Wait, _Outcome, Any]:
        begin = time.monotonic()
        deadline = begin + self.deadline_s
        ids = itertools.count(1)
        failures = hedges = 0
        not_before = 0.0
        hedge_ids: set[int] = set()
        last: object = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise RemoteScoringError(
                    f"no reward server answered within deadline_s={self.deadline_s:g} "
                    f"({failures} failed attempts; last: {last})"
                )
            if not inflight:
                if failures > self.retries:
                    raise RemoteScoringError(f"all reward servers failed after {failures} attempts: {last}")
                url = self._pick(set(), now)
                assert url is not None
                wait_for = max(not_before, self._not_before.get(url, 0.0)) - now
                if wait_for > 0:
                    yield _Wait(min(wait_for, deadline - now))
                    continue
                attempt = next(ids)
                inflight[attempt] = (url, now)
                if url in self._suspect:
                    self._trials.add(url)
                self.stats["attempts"] += 1
                yield _Send(attempt, url, max(0.001, min(self.timeout_s, deadline - now)))
                continue
            hedge_at = math.inf
            delay = self.hedge_delay()
            if delay is not None and hedges < 1:
                hedge_at = min(sent for _, sent in inflight.values()) + delay
            reply = yield _Wait(max(0.0, min(deadline, hedge_at) - now))
            now = time.monotonic()
            if reply is None:
                if now >= hedge_at:
                    hedges += 1  # hedge once per chunk, if any other replica is healthy
                    other = self._pick({u for u, _ in inflight.values()}, now)
                    if other is not None:
                        attempt = next(ids)
                        inflight[attempt] = (other, now)
                        if other in self._suspect:
                            self._trials.add(other)
                        hedge_ids.add(attempt)
                        self.stats["hedges"] += 1
                        self.stats["attempts"] += 1
                        yield _Send(attempt, other, max(0.001, min(self.timeout_s, deadline - now)))
                continue
            attempt, outcome = reply
            url, sent = inflight.pop(attempt)
            self._trials.discard(url)
            body: Any = None
            if not isinstance(outcome, BaseException) and outcome.status_code == 200:
                try:
                    body = outcome.json()
                    if payload is not None:
                        _check_body(path, payload, body)
                except Exception as exc:  # HTML, null, wrong shape, bad encoding, NaN as text
                    outcome = _BadAnswer(f"{url}{path} answered 200 with a bad body: {str(exc)[:200]}")
            if isinstance(outcome, BaseException):
                last = f"{type(outcome).__name__}: {outcome}"
                httpx = require_extra("httpx", "client")
                if isinstance(outcome, (_BadAnswer, httpx.TimeoutException, httpx.DecodingError)):
                    self._mark_suspect(url, last)  # a lying or hung replica: /health will not vouch for it
                else:
                    self._mark_down(url, last)
            elif outcome.status_code in RETRYABLE:
                last = f"HTTP {outcome.status_code}: {outcome.text[:200]}"
                wait = retry_after_seconds(outcome)
                if wait > 0:
                    self._not_before[url] = now + wait
                self._mark_down(url, last, max(wait, self.cooldown_s))
            elif outcome.status_code != 200:
                raise RemoteScoringError(
                    f"{url}{path} answered HTTP {outcome.status_code}: {outcome.text[:500]}"
                )
            else:
                self._latencies.append(now - sent)
                self._suspect.pop(url, None)
                self._mark_up(url)
                self.stats["hedge_wins"] += attempt in hedge_ids
                for other_url, other_sent in inflight.values():  # lost the race by a hedge delay
                    self._mark_suspect(
                        other_url, f"no answer after {now - other_sent:.1f} s while another replica answered"
                    )
                return body
            failures += 1
            self.stats["retries"] += 1
            if not inflight:
                not_before = now + self._delay(failures - 1)

    # -- drivers: the same policy; the sync API runs the async driver on an I/O thread ----
    def _io_loop(self) -> asyncio.AbstractEventLoop:
        """This client's event-loop thread (started on first use; again after a fork)."""
        with self._lock:
            if self._io is None or self._io[0] != os.getpid() or not self._io[2].is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="worldpm-client-io", daemon=True)
                thread.start()
                self._io, self._aclient = (os.getpid(), loop, thread), None
            return self._io[1]

    async def _shared_client(self) -> Any:
        httpx = require_extra("httpx", "client")
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(
                timeout=self.timeout_s,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self._aclient

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        loop = self._io_loop()

        async def on_io_thread() -> Any:
            return await self._apost(await self._shared_client(), path, payload)

        future = asyncio.run_coroutine_threadsafe(on_io_thread(), loop)
        try:
            return future.result()  # bounded by deadline_s
        except BaseException:
            future.cancel()
            raise

    async def _apost(self, client: Any, path: str, payload: dict[str, Any]) -> Any:
        self._start_prober()
        body, headers = _body(payload), self._headers(uuid.uuid4().hex)
        policy = self._attempts(path, payload)
        running: dict[asyncio.Task[Any], int] = {}
        try:
            step = next(policy)
            while True:
                reply: Any = None
                if isinstance(step, _Send):
                    task = asyncio.ensure_future(
                        client.post(f"{step.url}{path}", content=body, headers=headers, timeout=step.timeout)
                    )
                    running[task] = step.attempt
                elif not running:
                    await asyncio.sleep(step.seconds)
                else:
                    done, _ = await asyncio.wait(
                        running, timeout=step.seconds, return_when=asyncio.FIRST_COMPLETED
                    )
                    if done:
                        task = done.pop()
                        # any failure of one attempt (transport, decoding, ...) is that replica's
                        exc = task.exception()
                        reply = (running.pop(task), exc if exc is not None else task.result())
                step = policy.send(reply)
        except StopIteration as finished:
            return finished.value
        finally:
            policy.close()
            for task in running:  # a losing hedge: cancelled, its connection closed
                task.cancel()

    # -- /v1/score --------------------------------------------------------------------
    def _chunks(self, samples: Sequence[Any]) -> list[list[Any]]:
        items = [_payload_sample(s) for s in samples]
        return [items[i : i + self.max_chunk] for i in range(0, len(items), self.max_chunk)]

    @staticmethod
    def _results(body: dict[str, Any], expected: int) -> list[ScoreResult]:
        try:
            _check_body("/v1/score", {"samples": [None] * expected}, body)
        except _BadAnswer as exc:
            raise RemoteScoringError(f"the reward server answered nonsense: {exc}") from None
        results = body["results"]
        return [
            ScoreResult(
                score=r.get("score"),
                num_tokens=int(r.get("num_tokens") or 0),
                truncated=bool(r.get("truncated")),
                response_truncated=bool(r.get("response_truncated")),
                error=r.get("error"),
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
        try:
            _check_body("/get_reward", payload, body)
        except _BadAnswer as exc:
            raise RemoteScoringError(f"/get_reward answered nonsense: {exc}") from None
        return body  # type: ignore[no-any-return]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            io, self._io = self._io, None
        if io is not None and io[0] == os.getpid():
            _, loop, thread = io
            aclient, self._aclient = self._aclient, None
            if aclient is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(aclient.aclose(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()
