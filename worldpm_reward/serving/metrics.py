"""The reward server's Prometheus metrics: one registry per app, its counters, and the few
things that feed them (request outcomes, scored results, model calls).

prometheus-client (extra ``serve``) is imported when the metrics are created.
"""

from __future__ import annotations

from typing import Any

from worldpm_reward.batcher import BatchReport
from worldpm_reward.errors import require_extra
from worldpm_reward.samples import ScoreResult

#: The scoring endpoints whose responses are counted by status, by the end of their path (a
#: Ray Serve route prefix may come before it).
_ENDPOINTS = (("/get_reward", "get_reward"), ("/v1/score", "score"))


class ServerMetrics:
    """The app's metrics (``GET /metrics`` renders :meth:`render`)."""

    def __init__(self) -> None:
        prom = require_extra("prometheus_client", "serve")
        self._prom = prom
        self.registry = registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "worldpm_reward_requests", "HTTP requests", ["endpoint", "status"], registry=registry
        )
        self.item_errors = prom.Counter(
            "worldpm_reward_item_errors", "items that could not be scored", registry=registry
        )
        self.unknown_format = prom.Counter(
            "worldpm_reward_unknown_chat_format", "queries with no known chat markup", registry=registry
        )
        self.queue = prom.Gauge(
            "worldpm_reward_queue_samples", "samples waiting to be scored", registry=registry
        )
        self.batch = prom.Histogram(
            "worldpm_reward_batch_samples",
            "samples per model call",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_seconds = prom.Histogram(
            "worldpm_reward_batch_seconds", "seconds per model call", registry=registry
        )
        self.latency = prom.Histogram(
            "worldpm_reward_request_seconds", "request latency", ["endpoint"], registry=registry
        )
        self.tokens = prom.Counter(
            "worldpm_reward_tokens",
            "tokens of the requests' own samples scored (rate() = tokens/s served)",
            registry=registry,
        )
        self.model_tokens = prom.Counter(
            "worldpm_reward_model_tokens",
            "tokens through the model, reference answers of reference-relative shaping included "
            "(rate() = the model's throughput; worldpm-reward serve's batcher only)",
            registry=registry,
        )
        self.samples = prom.Counter("worldpm_reward_samples", "samples scored", registry=registry)
        self.failed = prom.Counter(
            "worldpm_reward_failed_samples",
            "samples answered with an error instead of a score (bad input, a failed forward, a "
            "non-finite score; on /get_reward in fallback mode, those given the fallback reward)",
            registry=registry,
        )
        self.truncated = prom.Counter(
            "worldpm_reward_truncated", "samples cut to max_length", registry=registry
        )
        self.duplicates = prom.Counter(
            "worldpm_reward_duplicate_requests",
            "requests answered from the X-Request-ID cache (retries, hedges), not scored again",
            registry=registry,
        )
        self.unavailable = prom.Counter(
            "worldpm_reward_scorer_unavailable",
            "requests answered 503 because the scorer hung, died or was restarting",
            registry=registry,
        )
        self.state_failures = prom.Gauge(
            "worldpm_reward_state_file_failures",
            "failed merges into the running-normalization state file (logged; scoring goes on)",
            registry=registry,
        )
        self.nonfinite = prom.Counter(
            "worldpm_reward_nonfinite_scores",
            "samples whose score was not finite (each an error)",
            registry=registry,
        )

    def count_results(self, results: list[ScoreResult]) -> None:
        """One request's per-sample results (scored and failed, tokens, truncation, non-finite
        scores)."""
        failed = sum(r.error is not None for r in results)
        self.nonfinite.inc(sum("non-finite score" in (r.error or "") for r in results))
        self.tokens.inc(sum(r.num_tokens for r in results))
        self.samples.inc(len(results) - failed)
        self.failed.inc(failed)
        self.truncated.inc(sum(r.truncated for r in results))

    def observe_batch(self, report: BatchReport) -> None:
        """One model call of the batcher."""
        self.batch.observe(report.samples)
        self.batch_seconds.observe(report.seconds)
        self.model_tokens.inc(report.tokens)

    def count_responses(self, app: Any) -> Any:
        """ASGI middleware around ``app``: every response of the scoring endpoints counted in
        ``worldpm_reward_requests_total`` by status, the ones refused before the handler runs
        (401, a malformed or oversized body, a slow upload) included."""
        requests = self.requests

        async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = str(scope.get("path", "")) if scope.get("type") == "http" else ""
            endpoint = next((name for end, name in _ENDPOINTS if path.endswith(end)), None)
            if endpoint is None:
                return await app(scope, receive, send)
            status: int | None = None

            async def sending(message: dict[str, Any]) -> None:
                nonlocal status
                if message.get("type") == "http.response.start" and status is None:
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:  # no response started: the app raised, and the error middleware answers 500
                requests.labels(endpoint, str(status if status is not None else 500)).inc()

        return counted

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics"]
