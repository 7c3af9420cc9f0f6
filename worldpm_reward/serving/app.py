"""The reward server's routes (``worldpm-reward serve``; also Ray Serve's ingress): FastAPI +
uvicorn. It routes, authenticates and reports readiness; the rest has its own module:
settings (:mod:`.config`), HTTP limits (:mod:`.limits`), the idempotency cache
(:mod:`.idempotency`), metrics (:mod:`.metrics`), the scorer's life and the batcher
(:mod:`.host`), the protocols (:mod:`.protocol`).

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
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from worldpm_reward.batcher import current_client
from worldpm_reward.errors import (
    QueueFullError,
    RequestError,
    ScorerUnavailableError,
    ServerClosingError,
    require_extra,
)
from worldpm_reward.samples import Scorer
from worldpm_reward.serving.config import ServerConfig, resolve_token
from worldpm_reward.serving.host import LocalHost, ServiceHost
from worldpm_reward.serving.idempotency import RecentRequests
from worldpm_reward.serving.limits import BodySizeLimit, parse_body, uvicorn_options
from worldpm_reward.serving.metrics import ServerMetrics
from worldpm_reward.serving.protocol import RewardService
from worldpm_reward.shaping import ShapingConfig

logger = logging.getLogger(__name__)


def create_app(
    target: RewardService | Scorer | Callable[[], Scorer],
    config: ServerConfig | None = None,
    shaping: ShapingConfig | None = None,
) -> Any:
    """Build the FastAPI app.

    Args:
        target: a :class:`RewardService` built by its host around its own async scorer (Ray
            Serve: no batcher is built), or a sync scorer (loaded, or a zero-argument factory
            that loads one in a background thread at startup; /health answers 503 until it is
            done) to serve behind the cross-call batcher (``worldpm-reward serve``).
        config: server settings.
        shaping: reward shaping applied to every request (a given service has its own).
    """
    fastapi = require_extra("fastapi", "serve")
    pydantic = require_extra("pydantic", "serve")
    from fastapi.responses import JSONResponse, Response

    cfg = config or ServerConfig()
    metrics = ServerMetrics()
    host: ServiceHost
    if isinstance(target, RewardService):
        host = ServiceHost(target)
        target.on_results = metrics.count_results
        target.on_unknown_format = metrics.unknown_format.inc
    else:
        host = LocalHost(
            target,
            cfg,
            shaping,
            on_batch=metrics.observe_batch,
            on_results=metrics.count_results,
            on_unknown_format=metrics.unknown_format.inc,
        )
    service = host.service
    batcher = host.batcher
    recent = RecentRequests(cfg.request_id_cache, cfg.request_id_cache_bytes)
    shaper = service.reward.shaper
    shaper.background_sync = True  # state-file I/O and locking never run on the event loop
    retry_after = {"Retry-After": str(cfg.retry_after_s)}

    def queued() -> int:
        return 0 if batcher is None else batcher.queued_samples

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        host.start()
        yield
        # bounded by drain_timeout_s from the exit signal, whatever the scorer does
        begun = getattr(app.state, "exit_requested_at", None) or time.monotonic()
        drain = cfg.drain_timeout_s

        def left(floor: float = 0.5) -> float | None:
            return None if drain is None else max(floor, begun + drain - time.monotonic())

        try:
            await host.stop(left)
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
        retry_after_s=cfg.retry_after_s,
    )
    app.add_middleware(metrics.count_responses)  # outermost: counts what BodySizeLimit refuses too

    class GetRewardRequest(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        # items checked one by one (RewardService.get_reward): a bad one is that item's error
        query: list[Any]
        prompts: list[Any] | None = None
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
        if host.closing:
            raise fastapi.HTTPException(503, "shutting down", headers=retry_after)
        if host.scorer is None:
            detail = host.error or "the reward model is still loading"
            raise fastapi.HTTPException(503, detail, headers=retry_after)

    async def until_disconnected(request: Any) -> None:
        """Returns when the client disconnects: the server's ``receive`` blocks (no polling)
        until the connection is lost, once the body has been read."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def unless_abandoned(request: Any, coro: Any) -> Any:
        """Run ``coro`` (in its own task); if the client goes away first, cancel it, so its
        samples are dropped from the queue instead of scored for nobody."""
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
        try:
            check_ready()
            metrics.queue.set(queued())
            peer = request.client.host if request.client else ""
            current_client.set(request.headers.get("x-client-id") or peer)
            key = None
            request_id = request.headers.get("x-request-id")
            if request_id and recent.size:
                key = (endpoint, request_id, hashlib.sha256(await request.body()).digest())
            result, fresh = await unless_abandoned(request, recent.once(key, coro_fn))
            if not fresh:
                metrics.duplicates.inc()
            return result
        except RequestError as exc:
            if exc.status == 422:
                metrics.item_errors.inc(len(exc.detail) if isinstance(exc.detail, list) else 1)
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        except QueueFullError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after)
        except (ServerClosingError, ScorerUnavailableError) as exc:
            if isinstance(exc, ScorerUnavailableError):
                metrics.unavailable.inc()
            return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after)
        except Exception as exc:  # a bug or a scorer failure: never a bare 500 (HTTPExceptions pass)
            if isinstance(exc, fastapi.HTTPException):
                raise
            logger.exception("%s failed", endpoint)
            return JSONResponse(
                {"detail": f"internal error ({type(exc).__name__}: {str(exc)[:200]}); see the server log"},
                status_code=500,
            )
        finally:  # the response is counted by status in metrics.count_responses
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            metrics.queue.set(queued())

    def body_doc(model: Any) -> dict[str, Any]:
        schema = model.model_json_schema()
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    @app.post(
        "/get_reward", dependencies=[fastapi.Depends(check_auth)], openapi_extra=body_doc(GetRewardRequest)
    )
    async def get_reward(request: fastapi.Request) -> Any:  # type: ignore[name-defined]
        """OpenRLHF's remote reward protocol: rewards for policy-rendered prompt+response texts."""
        body = await parse_body(request, GetRewardRequest)
        return await run(
            "get_reward", lambda: service.get_reward(body.query, body.prompts, body.labels), request
        )

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
        current = host.scorer
        ready = current is not None and not host.closing and getattr(current, "alive", True)
        reason = host.error or (None if current is None or ready else getattr(current, "reason", None))
        if host.closing:
            status = "shutting down"
        elif ready:
            status = "ok"
        elif host.error:
            status = "error"
        elif current is None:
            status = "loading"
        else:
            status = "unavailable"
        body: dict[str, Any] = {"status": status, "ready": ready, "live": True, "model": cfg.name}
        if batcher is not None:  # under Ray Serve its own batching queues, not reported here
            body["queued_samples"] = batcher.queued_samples
        if reason:  # the details (paths, exception text) only for an authorized caller
            first = str(reason).strip().splitlines()[0][:300] if str(reason).strip() else ""
            body["error"] = (
                first if authorized(request) else "the scorer is not ready (details: see the server log)"
            )
        metrics.state_failures.set(shaper.sync_failures)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/health/live")
    async def live() -> Any:
        return {"live": True}

    @app.get("/metrics", dependencies=[fastapi.Depends(check_auth)])
    async def metrics_page() -> Any:
        metrics.queue.set(queued())
        metrics.state_failures.set(shaper.sync_failures)
        text, media_type = metrics.render()
        return Response(text, media_type=media_type)

    app.state.service = service
    app.state.batcher = batcher
    app.state.recent_requests = recent
    app.state.metrics = metrics
    return app


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


def wait_until_ready(url: str, timeout_s: float = 60.0) -> None:
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


__all__ = ["create_app", "draining_server", "run_server", "wait_until_ready"]
