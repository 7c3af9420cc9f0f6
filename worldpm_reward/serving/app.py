"""The HTTP app and server (``worldpm-reward serve``): FastAPI + uvicorn, cross-request batching.

Endpoints:
  * ``POST /get_reward``: OpenRLHF's remote reward protocol (``--reward.remote_url``).
  * ``POST /v1/score``: the native JSON API (conversations in, per-item results out).
  * ``GET /health``: 200 when the model is loaded and serving, 503 while loading or
    shutting down; ``GET /health/live``: 200 while the process runs.
  * ``GET /metrics``: Prometheus metrics (requests, errors, queue depth, batch sizes,
    latencies, tokens).
Secure defaults: binds 127.0.0.1; an optional bearer token guards everything but the
health checks; request bodies are size-limited (413); a full queue answers 503 with
``Retry-After``; a bad item is a 422 naming it. On SIGTERM/SIGINT in-flight requests are
finished before exit.

FastAPI, uvicorn, pydantic and prometheus-client come from the ``serve`` extra and are
imported only when an app is created.
"""

import asyncio
import collections
import contextlib
import hashlib
import inspect
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worldpm_reward.errors import (
    ConfigError,
    QueueFullError,
    RequestError,
    ScorerUnavailableError,
    ServerClosingError,
    require_extra,
)
from worldpm_reward.samples import Scorer, ScoreResult, finite_or_error, loads_json
from worldpm_reward.serving.protocol import DEFAULT_FALLBACK_REWARD, RewardService, Submit
from worldpm_reward.serving.queue import BatchReport, DynamicBatcher, current_client
from worldpm_reward.shaping import ShapingConfig

logger = logging.getLogger(__name__)

TOKEN_ENV = "WORLDPM_REWARD_TOKEN"


@dataclass
class ServerConfig:
    """Settings of the HTTP server.

    Attributes:
        host: interface to bind; 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port.
        token: bearer token required on every endpoint except /health (None: no auth).
            The CLI reads it from the WORLDPM_REWARD_TOKEN environment variable.
        max_body_bytes: largest accepted request body, in bytes (larger: 413).
        max_items: most items in one request (larger: 413).
        max_queue: most samples waiting to be scored (more: 503 + Retry-After).
        max_wait_ms: how long a request waits for others to share its batch, in ms, when the
            scorer is idle (0: start at once; requests that arrive while a batch runs form the next).
        max_batch_samples: most samples per model call.
        max_piece_tokens: most estimated tokens per model call and per piece of a request
            (fair scheduling in tokens: a small request waits at most about one piece behind
            a token-heavy one); None: bounded by samples only.
        chat_format: how OpenRLHF queries are parsed ("auto", "chatml", "llama3", ...).
        name: reward name used in extra_logs keys and metrics labels.
        retry_after_s: the Retry-After value sent with 503, in seconds.
        fallback_reward: /get_reward (OpenRLHF): an item that cannot be scored gets this
            reward and status 200 (flagged in extra_logs) instead of 422. Default -10 (the low
            end of OpenRLHF's default clip range); None: 422.
        openrlhf_scores: /get_reward's ``scores``: "reward" or "sigmoid" (in (0, 1), for
            OpenRLHF's dynamic filtering).
        scores_temperature: scale of the "sigmoid" mapping: ``sigmoid(reward / T)``.
        drain_timeout_s: on SIGTERM/SIGINT the server stops accepting and finishes every
            request already taken in; this caps how long that may take (None: no cap, so a
            full queue is always finished).
        max_request_tokens: most estimated tokens in one request (more: 413); None: no bound.
        max_queue_tokens: most estimated tokens waiting to be scored (more: 503 + Retry-After).
        max_upload_bytes: most request-body bytes held in memory by all uploads together
            (a body that would exceed it: 503 + Retry-After).
        body_timeout_s: a request body must arrive within this many seconds (else 408).
        header_timeout_s: a request's headers must arrive within this many seconds of its
            first byte, and a new connection must start its first request within it (else the
            connection is closed).
        idle_timeout_s: a connection that sends nothing for this long (before its first
            request, or between keep-alive requests) is closed.
        max_connections: most open connections and requests at once (more: 503).
        request_id_cache: how many answers are kept by ``X-Request-ID``, so a retried or
            hedged request is answered again without being scored (or counted by the running
            normalization) twice; 0 turns it off.
        request_id_cache_bytes: most bytes of answers kept by that cache (the oldest go first).
        allow_no_auth: serve without a token on a non-loopback host (otherwise refused).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_body_bytes: int = 16 * 2**20
    max_items: int = 4096
    max_queue: int = 8192
    max_wait_ms: float = 0.0
    max_batch_samples: int = 256
    max_piece_tokens: int | None = 65536
    chat_format: str = "auto"
    name: str = "worldpm"
    retry_after_s: int = 1
    fallback_reward: float | None = DEFAULT_FALLBACK_REWARD
    drain_timeout_s: float | None = None
    openrlhf_scores: str = "reward"
    scores_temperature: float = 1.0
    max_request_tokens: int | None = 2_000_000
    max_queue_tokens: int | None = 8_000_000
    max_upload_bytes: int = 256 * 2**20
    body_timeout_s: float = 60.0
    header_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int | None = 4096
    request_id_cache: int = 4096
    request_id_cache_bytes: int = 64 * 2**20
    allow_no_auth: bool = False


class BodySizeLimit:
    """ASGI middleware that bounds request bodies: 413 over ``limit`` bytes (declared or
    streamed); 503 when all bodies being received together would hold more than
    ``total_limit`` bytes of memory; 408 when a body takes longer than ``timeout_s`` to arrive."""

    def __init__(
        self, app: Any, limit: int, total_limit: int | None = None, timeout_s: float | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.total_limit = total_limit
        self.timeout_s = timeout_s
        self.inflight_bytes = 0  # bytes of bodies received by requests that have not finished

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send, 413, f"request body too large (limit {self.limit} bytes)")
        seen = 0
        started = time.monotonic()
        complete = False  # the whole body has arrived: later receives (disconnect watch) are not timed

        async def limited_receive() -> Any:
            nonlocal seen, complete
            if self.timeout_s is None or complete:
                message = await receive()
            else:
                remaining = started + self.timeout_s - time.monotonic()
                try:
                    message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise _BodyError(
                        408, f"the request body did not arrive within {self.timeout_s:g} s"
                    ) from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                if seen > self.limit:
                    raise _BodyError(413, f"request body too large (limit {self.limit} bytes)")
                if self.total_limit is not None and self.inflight_bytes + chunk > self.total_limit:
                    raise _BodyError(503, "the server holds too many uploads right now; retry shortly")
                self.inflight_bytes += chunk
                complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyError as exc:
            await self._reject(send, exc.status, exc.detail)
        finally:
            self.inflight_bytes -= seen

    async def _reject(self, send: Any, status: int, detail: str) -> None:
        headers = [(b"content-type", b"application/json")]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


def guarded_protocol(base: type, header_timeout_s: float) -> type:
    """A uvicorn HTTP protocol class (h11 or httptools) that also closes connections which
    send nothing within ``header_timeout_s`` of connecting (uvicorn's keep-alive timer, armed
    at connect too) and connections whose request headers do not complete within it."""

    class Guarded(base):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer: Any = None
            self._header_cycle: Any = None
            self.timeout_keep_alive_task = self.loop.call_later(  # until the first byte
                header_timeout_s, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._header_cycle:
                self._header_timer.cancel()  # the pending request's headers arrived
                self._header_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if self._header_timer is None and idle and not self.transport.is_closing():
                self._header_cycle = self.cycle
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._header_cycle and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """The uvicorn settings that enforce ``config``'s connection bounds."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return {
        "http": guarded_protocol(AutoHTTPProtocol, config.header_timeout_s),
        "timeout_keep_alive": max(1, int(config.idle_timeout_s)),
        "limit_concurrency": config.max_connections,
        "timeout_graceful_shutdown": None if config.drain_timeout_s is None else int(config.drain_timeout_s),
    }


async def parse_body(request: Any, model: Any) -> Any:
    """The request body as ``model``, or a 4xx that says what is wrong: 415 for a content type
    or encoding other than JSON, 413 over the size limit (declared or streamed), 400 for a body
    that is not UTF-8 JSON (NaN, Infinity and out-of-range numbers included, or nested too
    deeply), 422 for JSON of the wrong shape (without echoing the input back)."""
    import pydantic
    from fastapi import HTTPException

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise HTTPException(415, f"send the body as JSON with Content-Type: application/json (got {ctype!r})")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise HTTPException(415, f"Content-Encoding {encoding!r} is not accepted; send plain JSON")
    raw = await request.body()  # BodySizeLimit turns oversize / slow / too many uploads into 413 / 408 / 503
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            400, f"the request body is not UTF-8 (invalid byte at offset {exc.start})"
        ) from None
    try:
        data = loads_json(text)
    except RecursionError:
        raise HTTPException(400, "the request body's JSON is nested too deeply") from None
    except ValueError as exc:
        raise HTTPException(400, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        detail = [
            {"loc": ["body", *map(str, e.get("loc", ()))], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]
        ]
        raise HTTPException(422, detail) from None


class _BodyError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class RecentRequests:
    """Answers by request key (endpoint, ``X-Request-ID``, body hash), so a retried or hedged
    request is answered again without being scored, or counted by running normalization,
    twice. A duplicate that arrives while the first copy is still running waits for it; a
    copy that failed or was abandoned is forgotten (the next copy runs). LRU, at most ``size``
    keys and about ``max_bytes`` bytes of answers (as JSON)."""

    def __init__(self, size: int, max_bytes: int = 64 * 2**20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[Any, asyncio.Future[Any]] = collections.OrderedDict()
        self._sizes: dict[Any, int] = {}

    def _evict(self) -> None:
        while len(self._entries) > self.size or (self.bytes > self.max_bytes and len(self._entries) > 1):
            key, _ = self._entries.popitem(last=False)
            self.bytes -= self._sizes.pop(key, 0)

    async def once(self, key: Any, coro_fn: Callable[[], Any]) -> tuple[Any, bool]:
        """``(result, fresh)``: fresh is False when the answer is another copy's."""
        while key is not None and key in self._entries:
            first = self._entries[key]
            self._entries.move_to_end(key)
            try:
                return await asyncio.shield(first), False
            except asyncio.CancelledError:
                if not first.cancelled():
                    raise  # this request itself was cancelled
            except Exception:  # the first copy failed; this one runs
                continue
        if key is None:
            return await coro_fn(), True
        mine: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._entries[key] = mine
        self._evict()
        try:
            result = await coro_fn()
        except BaseException as exc:
            if self._entries.get(key) is mine:
                del self._entries[key]
                self.bytes -= self._sizes.pop(key, 0)
            if isinstance(exc, asyncio.CancelledError):
                mine.cancel()
            else:
                mine.set_exception(exc)
                mine.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        mine.set_result(result)
        if self._entries.get(key) is mine:
            try:
                size = len(json.dumps(result, default=str))
            except (TypeError, ValueError):
                size = 0
            if size > self.max_bytes:  # larger than the whole cache: not kept
                del self._entries[key]
            else:
                self._sizes[key] = size
                self.bytes += size
                self._evict()
        return result, True


def create_app(
    scorer: Scorer | Callable[[], Scorer],
    config: ServerConfig | None = None,
    shaping: ShapingConfig | None = None,
    submit: Submit | None = None,
) -> Any:
    """Build the FastAPI app.

    Args:
        scorer: a loaded scorer, or a zero-argument factory that loads one; a factory runs
            in a background thread at startup, and /health answers 503 until it is done.
        config: server settings.
        shaping: reward shaping applied to every request.
        submit: score through this coroutine instead of the built-in dynamic batcher (the
            Ray Serve deployment passes a coroutine that goes through its ``@serve.batch``
            method); the built-in batcher is then never started.
    """
    fastapi = require_extra("fastapi", "serve")
    pydantic = require_extra("pydantic", "serve")
    prom = require_extra("prometheus_client", "serve")
    from fastapi.responses import JSONResponse, Response

    cfg = config or ServerConfig()
    registry = prom.CollectorRegistry()
    m_requests = prom.Counter(
        "worldpm_reward_requests", "HTTP requests", ["endpoint", "status"], registry=registry
    )
    m_item_errors = prom.Counter(
        "worldpm_reward_item_errors", "items that could not be scored", registry=registry
    )
    m_unknown = prom.Counter(
        "worldpm_reward_unknown_chat_format", "queries with no known chat markup", registry=registry
    )
    m_queue = prom.Gauge("worldpm_reward_queue_samples", "samples waiting to be scored", registry=registry)
    m_batch = prom.Histogram(
        "worldpm_reward_batch_samples",
        "samples per model call",
        registry=registry,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    )
    m_batch_s = prom.Histogram("worldpm_reward_batch_seconds", "seconds per model call", registry=registry)
    m_latency = prom.Histogram(
        "worldpm_reward_request_seconds", "request latency", ["endpoint"], registry=registry
    )
    m_tokens = prom.Counter("worldpm_reward_tokens", "tokens scored (rate() = tokens/s)", registry=registry)
    m_samples = prom.Counter("worldpm_reward_samples", "samples scored", registry=registry)
    m_truncated = prom.Counter("worldpm_reward_truncated", "samples cut to max_length", registry=registry)
    m_duplicates = prom.Counter(
        "worldpm_reward_duplicate_requests",
        "requests answered from the X-Request-ID cache (retries, hedges), not scored again",
        registry=registry,
    )
    m_unavailable = prom.Counter(
        "worldpm_reward_scorer_unavailable",
        "requests answered 503 because the scorer hung, died or was restarting",
        registry=registry,
    )
    m_state_failures = prom.Gauge(
        "worldpm_reward_state_file_failures",
        "failed merges into the running-normalization state file (logged; scoring goes on)",
        registry=registry,
    )
    m_nonfinite = prom.Counter(
        "worldpm_reward_nonfinite_scores",
        "samples whose score was not finite (each an error)",
        registry=registry,
    )

    state: dict[str, Any] = {
        "scorer": None if callable(scorer) and not hasattr(scorer, "score_detailed") else scorer,
        "error": None,
        "closing": False,
    }

    def count(results: list[ScoreResult]) -> None:
        finite_or_error(results, None)  # any host's scorer: a non-finite score is that sample's error
        m_nonfinite.inc(sum("non-finite score" in (r.error or "") for r in results))
        m_tokens.inc(sum(r.num_tokens for r in results))
        m_samples.inc(len(results))
        m_truncated.inc(sum(r.truncated for r in results))

    def score_fn(samples: Any) -> Any:
        results = state["scorer"].score_detailed(samples)
        count(results)
        return results

    def on_batch(report: BatchReport) -> None:
        m_batch.observe(report.samples)
        m_batch_s.observe(report.seconds)

    batcher = DynamicBatcher(
        score_fn,
        max_batch_samples=cfg.max_batch_samples,
        max_wait_s=cfg.max_wait_ms / 1000,
        max_queue=cfg.max_queue,
        max_queue_tokens=cfg.max_queue_tokens,
        on_batch=on_batch,
        pipeline=True,
        max_batch_tokens=cfg.max_piece_tokens,
    )
    own_batcher = submit is None
    if submit is not None:
        host_submit = submit

        async def submit_and_count(samples: Any) -> list[ScoreResult]:
            results = await host_submit(samples)
            count(results)
            return results

        chosen: Submit = submit_and_count
    else:
        chosen = batcher.submit
    service = RewardService(
        chosen,
        shaping=shaping,
        chat_format=cfg.chat_format,
        name=cfg.name,
        max_items=cfg.max_items,
        fallback_reward=cfg.fallback_reward,
        scores=cfg.openrlhf_scores,
        scores_temperature=cfg.scores_temperature,
        max_request_tokens=cfg.max_request_tokens,
    )
    recent = RecentRequests(cfg.request_id_cache, cfg.request_id_cache_bytes)
    shaper = service.reward.shaper
    shaper.background_sync = True  # state-file I/O and locking never run on the event loop

    def load() -> None:
        try:
            state["scorer"] = scorer()  # type: ignore[operator]
            logger.info("reward model loaded; serving")
        except Exception as exc:  # reported by /health
            logger.exception("loading the reward model failed")
            state["error"] = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        if own_batcher:
            batcher.start()
        if state["scorer"] is None:
            threading.Thread(target=load, name="worldpm-load", daemon=True).start()
        yield
        state["closing"] = True
        # bounded by drain_timeout_s from the exit signal, whatever the scorer does
        begun = getattr(app.state, "exit_requested_at", None) or time.monotonic()
        drain = cfg.drain_timeout_s

        def left(floor: float = 0.5) -> float | None:
            return None if drain is None else max(floor, begun + drain - time.monotonic())

        try:
            if own_batcher:
                try:  # uvicorn stops accepting first; queued work is finished
                    await asyncio.wait_for(batcher.stop(), timeout=left())
                except asyncio.TimeoutError:
                    logger.error("drain timeout: %d queued samples not scored", batcher.queued_samples)
                    batcher.abort(
                        ServerClosingError("the reward server shut down before scoring this request")
                    )
            close = getattr(state["scorer"], "close", None)
            if close is not None:  # e.g. a ProcessScorer's child process
                timeout = left(1.0)
                if timeout is not None and "timeout_s" in inspect.signature(close).parameters:
                    await asyncio.to_thread(close, timeout_s=timeout)
                else:
                    await asyncio.to_thread(close)
        finally:
            try:  # running statistics to the state file, if any: always attempted
                await asyncio.to_thread(shaper.sync, True, True)
            except Exception as exc:
                logger.error("saving the running statistics at shutdown failed: %s", exc)

    docs = {} if cfg.token is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = fastapi.FastAPI(
        title="worldpm-reward",
        version="0.1.0",
        lifespan=lifespan,
        **docs,
        description="WorldPM reward scoring with cross-request batching. Scores are raw reward-model outputs "
        "(higher = preferred); 'reward' is after the server's shaping.",
    )
    app.add_middleware(
        BodySizeLimit,
        limit=cfg.max_body_bytes,
        total_limit=cfg.max_upload_bytes,
        timeout_s=cfg.body_timeout_s,
    )

    class GetRewardRequest(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        query: list[str]
        prompts: list[str] | None = None
        labels: list[Any] | None = None

    class ScoreRequest(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        samples: list[Any] = pydantic.Field(
            description="each: a list of {role, content} messages ending with the assistant reply, "
            "{'messages': [...]}, or {'prompt': str | [messages], 'response': str}; "
            "optional 'reference'",
        )

    def check_auth(request: fastapi.Request) -> None:  # type: ignore[name-defined]
        if cfg.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # bytes: compare_digest raises on non-ASCII str, and a client must never cause a 5xx
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            value.strip().encode("utf-8", "surrogatepass"), cfg.token.encode("utf-8", "surrogatepass")
        ):
            raise fastapi.HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def check_ready() -> None:
        if state["closing"]:
            raise fastapi.HTTPException(503, "shutting down", headers={"Retry-After": str(cfg.retry_after_s)})
        if state["scorer"] is None:
            detail = state["error"] or "the reward model is still loading"
            raise fastapi.HTTPException(503, detail, headers={"Retry-After": str(cfg.retry_after_s)})

    async def until_disconnected(request: Any) -> None:
        """Returns when the client disconnects: the server's ``receive`` blocks (no polling)
        until the connection is lost, once the body has been read."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def unless_abandoned(request: Any, coro: Any) -> Any:
        """Run ``coro``; if the client goes away first, cancel it, so its samples are dropped
        from the queue instead of scored for nobody."""
        work = asyncio.ensure_future(coro)
        watch = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            raise RequestError(499, "client closed the request")
        return work.result()

    async def run(endpoint: str, coro_fn: Callable[[], Any], request: Any) -> Any:
        start = time.perf_counter()
        status = 200
        try:
            check_ready()
            m_queue.set(batcher.queued_samples)
            peer = request.client.host if request.client else ""
            current_client.set(request.headers.get("x-client-id") or peer)
            key = None
            request_id = request.headers.get("x-request-id")
            if request_id and recent.size:
                key = (endpoint, request_id, hashlib.sha256(await request.body()).digest())
            result, fresh = await recent.once(key, lambda: unless_abandoned(request, coro_fn()))
            if not fresh:
                m_duplicates.inc()
            return result
        except RequestError as exc:
            status = exc.status
            if status == 422:
                m_item_errors.inc(len(exc.detail) if isinstance(exc.detail, list) else 1)
            return JSONResponse({"detail": exc.detail}, status_code=status)
        except QueueFullError as exc:
            status = 503
            return JSONResponse(
                {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(cfg.retry_after_s)}
            )
        except (ServerClosingError, ScorerUnavailableError) as exc:
            status = 503
            if isinstance(exc, ScorerUnavailableError):
                m_unavailable.inc()
            return JSONResponse(
                {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(cfg.retry_after_s)}
            )
        except fastapi.HTTPException as exc:
            status = exc.status_code
            raise
        except Exception as exc:  # a bug or a scorer failure: never a bare 500
            status = 500
            logger.exception("%s failed", endpoint)
            return JSONResponse(
                {"detail": f"internal error ({type(exc).__name__}: {str(exc)[:200]}); see the server log"},
                status_code=500,
            )
        finally:
            m_requests.labels(endpoint, str(status)).inc()
            m_latency.labels(endpoint).observe(time.perf_counter() - start)
            m_queue.set(batcher.queued_samples)

    def body_doc(model: Any) -> dict[str, Any]:
        schema = model.model_json_schema()
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    @app.post(
        "/get_reward", dependencies=[fastapi.Depends(check_auth)], openapi_extra=body_doc(GetRewardRequest)
    )
    async def get_reward(request: fastapi.Request) -> Any:  # type: ignore[name-defined]
        """OpenRLHF's remote reward protocol: rewards for policy-rendered prompt+response texts."""
        body = await parse_body(request, GetRewardRequest)
        before = service.stats.unknown_format
        try:
            return await run(
                "get_reward", lambda: service.get_reward(body.query, body.prompts, body.labels), request
            )
        finally:
            m_unknown.inc(service.stats.unknown_format - before)

    @app.post("/v1/score", dependencies=[fastapi.Depends(check_auth)], openapi_extra=body_doc(ScoreRequest))
    async def score(request: fastapi.Request) -> Any:  # type: ignore[name-defined]
        """Score conversations: one result per sample, in order; bad samples get an error each."""
        body = await parse_body(request, ScoreRequest)
        return await run("score", lambda: service.score(body.samples), request)

    def authorized(request: Any) -> bool:
        try:
            check_auth(request)
        except fastapi.HTTPException:
            return False
        return True

    @app.get("/health")
    async def health(request: fastapi.Request) -> Any:  # type: ignore[name-defined]
        current = state["scorer"]
        ready = current is not None and not state["closing"] and getattr(current, "alive", True)
        reason = state["error"] or (None if current is None or ready else getattr(current, "reason", None))
        if state["closing"]:
            status = "shutting down"
        elif ready:
            status = "ok"
        elif state["error"]:
            status = "error"
        elif current is None:
            status = "loading"
        else:
            status = "unavailable"
        body = {
            "status": status,
            "ready": ready,
            "live": True,
            "model": cfg.name,
            "queued_samples": batcher.queued_samples,
        }
        if reason:  # the details (paths, exception text) only for an authorized caller
            first = str(reason).strip().splitlines()[0][:300] if str(reason).strip() else ""
            body["error"] = (
                first if authorized(request) else "the scorer is not ready (details: see the server log)"
            )
        m_state_failures.set(shaper.sync_failures)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/health/live")
    async def live() -> Any:
        return {"live": True}

    @app.get("/metrics", dependencies=[fastapi.Depends(check_auth)])
    async def metrics() -> Any:
        m_queue.set(batcher.queued_samples)
        m_state_failures.set(shaper.sync_failures)
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    app.state.service = service
    app.state.batcher = batcher
    app.state.recent_requests = recent
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def resolve_token(config: ServerConfig) -> None:
    """The bearer token from the config or WORLDPM_REWARD_TOKEN, surrounding whitespace
    stripped (a trailing newline from a file would otherwise refuse every client); refuses
    (ConfigError) to serve a non-loopback host without one unless ``allow_no_auth``."""
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and token != token.strip():
        logger.warning(
            "the bearer token has surrounding whitespace (e.g. a trailing newline); it is stripped"
        )
        token = token.strip()
    config.token = token or None
    if config.host not in LOOPBACK and config.token is None:
        if not config.allow_no_auth:
            raise ConfigError(
                f"refusing to serve on {config.host} without a bearer token: anyone who can reach it could "
                f"use it. Set {TOKEN_ENV}, bind --host 127.0.0.1, or pass --no-auth to serve without one"
            )
        logger.warning(
            "serving on %s without a bearer token (--no-auth): anyone who can reach it can use it",
            config.host,
        )


def run_server(
    scorer: Scorer | Callable[[], Scorer], config: ServerConfig, shaping: ShapingConfig | None = None
) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are finished first (bounded by
    ``drain_timeout_s``), a second SIGINT drains the same way, and the running statistics
    are saved last."""
    uvicorn = require_extra("uvicorn", "serve")
    resolve_token(config)
    app = create_app(scorer, config, shaping)
    server = draining_server(uvicorn, app)(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="info", **uvicorn_options(config))
    )
    server.run()


def draining_server(uvicorn: Any, app: Any) -> type:
    """uvicorn's Server, except that a second SIGINT does not force an exit (which would give
    accepted requests a 500 and skip the final statistics save): every exit signal drains."""

    class DrainingServer(uvicorn.Server):  # type: ignore[misc,name-defined]
        def handle_exit(self, sig: int, frame: Any) -> None:
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:
                captured.append(sig)  # re-raised by uvicorn once it has shut down, as it does
            if not getattr(self, "should_exit", False):
                app.state.exit_requested_at = time.monotonic()
                logger.info("signal %d: draining, then exiting", sig)
            self.should_exit = True

    return DrainingServer


def wait_until_ready(url: str, timeout_s: float = 60.0, token: str | None = None) -> None:
    """Poll ``url``/health until it answers 200 (for scripts and tests)."""
    httpx = require_extra("httpx", "client")
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url.rstrip("/") + "/health", timeout=2.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


__all__ = ["ServerConfig", "create_app", "run_server", "wait_until_ready"]
