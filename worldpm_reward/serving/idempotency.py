"""The reward server's idempotency cache: answers by ``X-Request-ID``, so a retried or hedged
request is answered again, not scored (or counted by running normalization) twice."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from typing import Any


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


__all__ = ["RecentRequests"]
