"""Cross-request dynamic batching on an asyncio event loop.

Many small concurrent requests (OpenRLHF sends ONE sample per request from every rollout
actor) are queued; a single worker takes whole requests off the queue until it holds
``max_batch_samples`` samples or ``max_wait_s`` has passed since the first one, and runs
the scorer on all of them at once in a worker thread (the event loop keeps accepting
requests meanwhile, so the next batch fills while the model runs). The scorer's own
planner then sorts the batch into token-budgeted micro-batches. Each request gets exactly
its own results, in its own order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from worldpm_reward.errors import QueueFullError, ServerClosingError
from worldpm_reward.samples import ScoreResult

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    samples: list[Any]
    future: asyncio.Future[list[ScoreResult]]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchReport:
    """What one model call did (for metrics): sizes and seconds."""

    requests: int
    samples: int
    seconds: float
    queue_wait_s: float


class DynamicBatcher:
    """Queue requests, score them together.

    Args:
        score_fn: ``samples -> list[ScoreResult]`` (e.g. ``RewardModel.score_detailed``);
            called in one worker thread, never concurrently with itself.
        max_batch_samples: most samples per model call (a larger single request runs alone).
        max_wait_s: how long the first queued request waits for company.
        max_queue: most samples waiting; beyond it ``submit`` raises QueueFullError.
        on_batch: called with a :class:`BatchReport` after each model call.
    """

    def __init__(
        self,
        score_fn: Callable[[Sequence[Any]], list[ScoreResult]],
        *,
        max_batch_samples: int = 256,
        max_wait_s: float = 0.005,
        max_queue: int = 4096,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        self.score_fn = score_fn
        self.max_batch_samples = max_batch_samples
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._queued_samples = 0
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worldpm-scorer")
        self._closing = False
        self.abandoned_samples = 0  # dropped before scoring: their callers had gone

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="worldpm-batcher")

    async def submit(self, samples: Sequence[Any]) -> list[ScoreResult]:
        """Score ``samples`` together with whatever else is queued; results in input order."""
        if self._closing:
            raise ServerClosingError("the reward server is shutting down")
        if self._queue is None:
            self.start()
        assert self._queue is not None
        if not samples:
            return []
        if self._queued_samples + len(samples) > self.max_queue:
            raise QueueFullError(
                f"{self._queued_samples} samples already queued (max_queue={self.max_queue})"
            )
        pending = _Pending(list(samples), asyncio.get_running_loop().create_future())
        self._queued_samples += len(samples)
        self._queue.put_nowait(pending)
        return await pending.future

    async def stop(self) -> None:
        """Finish everything queued, then stop (graceful shutdown)."""
        self._closing = True
        if self._worker is not None and self._queue is not None:
            await self._queue.join()
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            size = len(first.samples)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_samples:
                nxt = self._next_nowait()
                if nxt is None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                    except asyncio.TimeoutError:
                        break
                if size + len(nxt.samples) > self.max_batch_samples:
                    # keep request boundaries: it opens the next batch
                    await self._run_batch(batch, size)
                    batch, size, deadline = [nxt], len(nxt.samples), loop.time() + self.max_wait_s
                    continue
                batch.append(nxt)
                size += len(nxt.samples)
            await self._run_batch(batch, size)

    def _next_nowait(self) -> _Pending | None:
        assert self._queue is not None
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _run_batch(self, batch: list[_Pending], size: int) -> None:
        assert self._queue is not None
        abandoned = [p for p in batch if p.future.done()]  # the caller gave up (e.g. disconnected)
        if abandoned:
            for p in abandoned:
                self._queued_samples -= len(p.samples)
                self._queue.task_done()
            self.abandoned_samples += sum(len(p.samples) for p in abandoned)
            batch = [p for p in batch if not p.future.done()]
            size = sum(len(p.samples) for p in batch)
            if not batch:
                return
        flat = [s for p in batch for s in p.samples]
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.score_fn, flat)
            error: Exception | None = None
        except Exception as exc:  # the model failed for the whole batch: fail these requests only
            logger.exception("scoring a batch of %d samples failed", size)
            results, error = [], exc
        seconds = time.perf_counter() - start
        offset = 0
        for p in batch:
            if not p.future.done():
                if error is not None:
                    p.future.set_exception(error)
                else:
                    p.future.set_result(results[offset : offset + len(p.samples)])
            offset += len(p.samples)
            self._queued_samples -= len(p.samples)
            self._queue.task_done()
        if self.on_batch is not None:
            wait = sum(start - p.enqueued for p in batch) / len(batch)
            self.on_batch(BatchReport(len(batch), size, seconds, wait))
