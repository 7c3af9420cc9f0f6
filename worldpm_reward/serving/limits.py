"""HTTP limits of the reward server: request-body bounds (size, total uploads, arrival time),
connection timeouts for uvicorn, and strict JSON body parsing.

FastAPI, pydantic and uvicorn (extra ``serve``) are imported when used.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from worldpm_reward.samples import loads_json
from worldpm_reward.serving.config import ServerConfig


class BodySizeLimit:
    """ASGI middleware that bounds request bodies: 413 over ``limit`` bytes (declared or
    streamed); 503 when all bodies being received together would hold more than
    ``total_limit`` bytes of memory (with ``Retry-After: retry_after_s``); 408 when a body
    takes longer than ``timeout_s`` to arrive."""

    def __init__(
        self,
        app: Any,
        limit: int,
        total_limit: int | None = None,
        timeout_s: float | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.retry_after_s = retry_after_s
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
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


class _BodyError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


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


__all__ = ["BodySizeLimit", "guarded_protocol", "parse_body", "uvicorn_options"]
