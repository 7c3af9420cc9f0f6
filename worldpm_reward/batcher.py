"""Cross-call dynamic batching on an asyncio event loop, fair across clients: an
:class:`~worldpm_reward.samples.AsyncScorer` around a sync :class:`~worldpm_reward.samples.Scorer`.

Used by the HTTP server (``worldpm-reward serve``) and by the veRL adapter
(``compute_score_async``).

Many small concurrent requests (OpenRLHF sends ONE sample per request from every rollout
actor) are queued; a single worker waits until ``max_batch_samples`` samples are queued or
``max_wait_s`` has passed since the oldest arrived, takes work off the queue and runs the
scorer's ``score_detailed`` on it in a worker thread (the event loop keeps accepting requests meanwhile, so the
next batch fills while the model runs). The scorer's own planner then sorts the batch into
token-budgeted micro-batches. Each request gets exactly its own results, in its own order.

Fairness: each client (``client`` argument of :meth:`DynamicBatcher.submit`, by default the
:data:`current_client` context variable that the HTTP app sets from the peer address or an
``X-Client-ID`` header) has its own FIFO, and batches are filled round-robin across
clients, one piece at a time. A large request is cut into pieces of at most
``max_batch_samples`` samples and (with ``max_batch_tokens``) at most that many estimated
tokens, and a batch holds at most that many tokens, so 4,000 samples, or six 30k-token
samples, from one client delay another client's request by at most about one piece's
scoring time, not by the whole request.

Pipelining (``pipeline=True``, the HTTP server): a batch takes at most half of what waits
(above 8 samples), so the front end answers and parses one half while the other is scored.

Bounds: ``max_queue`` samples and ``max_queue_tokens`` estimated tokens
(:func:`~worldpm_reward.samples.estimate_tokens`) may wait; beyond either, ``submit``
raises :class:`~worldpm_reward.errors.QueueFullError` (a 503 with Retry-After). A request
whose caller went away (its future is done) is dropped before it is scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from worldpm_reward.errors import QueueFullError, ServerClosingError
from worldpm_reward.samples import Scorer, ScoreResult, estimate_tokens

logger = logging.getLogger(__name__)

#: The client a submission is accounted to (fair scheduling), when ``submit`` is not told.
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("worldpm_client", default="")


@dataclass
class _Request:
    future: asyncio.Future[list[ScoreResult]]
    results: list[ScoreResult | None]
    pieces_left: int
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Piece:
    request: _Request
    offset: int
    samples: list[Any]
    tokens: int


@dataclass
class BatchReport:
    """What one model call did (for metrics): its samples, seconds and tokens through the model."""

    samples: int
    seconds: float
    tokens: int = 0
    #: samples of the call that came back with an error (all of them when the call itself failed)
    failed: int = 0
    #: the first of those errors
    first_error: str | None = None


class DynamicBatcher:
    """Queue requests, score them together, round-robin across clients
    (an :class:`~worldpm_reward.samples.AsyncScorer`).

    Args:
        scorer: a sync :class:`~worldpm_reward.samples.Scorer` (``RewardModel``, ``ProcessScorer``,
            ...); its ``score_detailed`` is called in one worker thread, never concurrently
            with itself.
        max_batch_samples: most samples per model call; larger requests are cut into pieces.
        max_wait_s: how long the oldest queued request waits for company.
        max_queue: most samples waiting; beyond it ``submit`` raises QueueFullError.
        max_queue_tokens: most estimated tokens waiting (None: no token bound); a request
            that arrives at an empty queue is always taken (bound single requests upstream).
        on_batch: called with a :class:`BatchReport` after each model call.
        pipeline: take at most half of what waits (above 8 samples), so that a front end in
            this process answers and parses one half while the other is scored (the HTTP
            server turns it on).
        max_batch_tokens: most estimated tokens per piece of a request and per batch (a
            single larger sample still goes alone); None: bounded by samples only.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_batch_samples: int = 256,
        max_wait_s: float = 0.005,
        max_queue: int = 4096,
        max_queue_tokens: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        pipeline: bool = False,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.scorer = scorer
        self.pipeline = pipeline
        self.max_batch_samples = max(1, max_batch_samples)
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens
        self.on_batch = on_batch
        self.min_split = 8  # batches up to this size are never split
        self._clients: OrderedDict[str, deque[_Piece]] = OrderedDict()
        self._queued_samples = 0
        self._queued_tokens = 0
        self._arrived: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worldpm-scorer")
        self._closing = False
        self._running: list[_Request] = []  # requests with a piece in the scorer now
        self.abandoned_samples = 0  # dropped before scoring: their callers had gone

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._arrived, self._idle = asyncio.Event(), asyncio.Event()
            self._idle.set()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="worldpm-batcher")

    async def ascore_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        """The AsyncScorer seam: :meth:`submit` for :data:`current_client`."""
        return await self.submit(samples)

    async def submit(
        self, samples: Sequence[Any], client: str | None = None, tokens: Sequence[int] | None = None
    ) -> list[ScoreResult]:
        """Score ``samples`` together with whatever else is queued; results in input order.
        ``client``: whom to account them to (default: :data:`current_client`); ``tokens``:
        each sample's cost (default: :func:`estimate_tokens`)."""
        if self._closing:
            raise ServerClosingError("the reward server is shutting down")
        if self._worker is None:
            self.start()
        if not samples:
            return []
        samples = list(samples)
        costs = list(tokens) if tokens is not None else [estimate_tokens(s) for s in samples]
        total = sum(costs)
        if self._queued_samples + len(samples) > self.max_queue:
            raise QueueFullError(
                f"{self._queued_samples} samples already queued (max_queue={self.max_queue})"
            )
        if (
            self.max_queue_tokens is not None
            and self._queued_samples
            and self._queued_tokens + total > self.max_queue_tokens
        ):
            raise QueueFullError(
                f"about {self._queued_tokens} tokens already queued and this request adds about {total} "
                f"(max_queue_tokens={self.max_queue_tokens})"
            )
        cuts = self._cuts(costs)
        request = _Request(asyncio.get_running_loop().create_future(), [None] * len(samples), len(cuts))
        queue = self._clients.setdefault(current_client.get() if client is None else client, deque())
        for start, stop in cuts:
            queue.append(_Piece(request, start, samples[start:stop], sum(costs[start:stop])))
        self._queued_samples += len(samples)
        self._queued_tokens += total
        assert self._arrived is not None and self._idle is not None
        self._idle.clear()
        self._arrived.set()
        return await request.future

    def _cuts(self, costs: list[int]) -> list[tuple[int, int]]:
        """A request's pieces: at most max_batch_samples samples and max_batch_tokens tokens each."""
        cuts: list[tuple[int, int]] = []
        start = tokens = 0
        for i, cost in enumerate(costs):
            full = i - start >= self.max_batch_samples or (
                self.max_batch_tokens is not None and i > start and tokens + cost > self.max_batch_tokens
            )
            if full:
                cuts.append((start, i))
                start, tokens = i, 0
            tokens += cost
        if start < len(costs):
            cuts.append((start, len(costs)))
        return cuts

    async def stop(self) -> None:
        """Finish everything queued, then stop (graceful shutdown)."""
        self._closing = True
        if self._worker is not None and self._idle is not None:
            await self._idle.wait()
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    def abort(self, error: Exception) -> None:
        """Stop now (a drain that ran out of time): every request not yet answered fails with
        ``error``; a batch still in the scorer is not waited for."""
        self._closing = True
        for queue in self._clients.values():
            for piece in queue:
                if not piece.request.future.done():
                    piece.request.future.set_exception(error)
        self._clients.clear()
        self._queued_samples = self._queued_tokens = 0
        for request in list(self._running):
            if not request.future.done():
                request.future.set_exception(error)
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the worker --------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._arrived is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._clients:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            oldest = min(q[0].request.enqueued for q in self._clients.values())
            while self._queued_samples < self.max_batch_samples:  # wait for company
                remaining = oldest + self.max_wait_s - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            batch = self._take()
            if batch:
                await self._run_batch(batch, loop)

    def _drop(self, piece: _Piece) -> None:
        self._queued_samples -= len(piece.samples)
        self._queued_tokens -= piece.tokens

    def _drop_abandoned(self) -> None:
        """Drop pieces whose request is done: cancelled (the caller went away) or failed in an
        earlier piece."""
        for client, queue in list(self._clients.items()):
            gone = [p for p in queue if p.request.future.done()]
            for p in gone:
                self._drop(p)
                self.abandoned_samples += len(p.samples) if p.request.future.cancelled() else 0
            if len(gone) == len(queue):
                del self._clients[client]
            elif gone:
                self._clients[client] = deque(p for p in queue if not p.request.future.done())

    def _take(self) -> list[_Piece]:
        """Fill one batch round-robin over clients, one piece per client per round; a client
        that got a piece goes to the back of the line."""
        self._drop_abandoned()
        batch: list[_Piece] = []
        size = tokens = 0
        progressed = True
        # take at most half of what waits (when much waits): the other half is in the front end's
        # hands while this half is scored, so parsing, scoring and answering overlap
        limit = self.max_batch_samples
        if self.pipeline:
            limit = min(limit, max(self.min_split, -(-self._queued_samples // 2)))
        while progressed and self._clients and size < limit:
            progressed = False
            for client in list(self._clients):
                queue = self._clients[client]
                piece = queue[0]
                if batch and (
                    size + len(piece.samples) > limit
                    or (self.max_batch_tokens is not None and tokens + piece.tokens > self.max_batch_tokens)
                ):
                    continue  # does not fit this batch; it opens a later one
                queue.popleft()
                self._drop(piece)  # no longer waiting: being scored
                batch.append(piece)
                size += len(piece.samples)
                tokens += piece.tokens
                progressed = True
                if queue:
                    self._clients.move_to_end(client)
                else:
                    del self._clients[client]
                if size >= limit:
                    break
        return batch

    async def _run_batch(self, batch: list[_Piece], loop: asyncio.AbstractEventLoop) -> None:
        flat = [s for p in batch for s in p.samples]
        start = time.perf_counter()
        self._running = [p.request for p in batch]
        try:
            results = await loop.run_in_executor(self._executor, self.scorer.score_detailed, flat)
            error: Exception | None = None
            if len(results) != len(flat):
                raise RuntimeError(f"the scorer returned {len(results)} results for {len(flat)} samples")
        except Exception as exc:  # the model failed for the whole batch: fail these requests only
            logger.error("scoring a batch of %d samples failed: %s", len(flat), exc)
            results, error = [], exc
        finally:
            self._running = []
        seconds = time.perf_counter() - start
        offset = 0
        for p in batch:
            request = p.request
            if not request.future.done():
                if error is not None:
                    request.future.set_exception(error)
                else:
                    request.results[p.offset : p.offset + len(p.samples)] = results[
                        offset : offset + len(p.samples)
                    ]
                    request.pieces_left -= 1
                    if request.pieces_left == 0:
                        request.future.set_result(request.results)  # type: ignore[arg-type]
            offset += len(p.samples)
        if self.on_batch is not None:
            tokens = sum(int(getattr(r, "num_tokens", 0) or 0) for r in results)
            errors = [str(error)] * len(flat) if error is not None else [r.error for r in results if r.error]
            self.on_batch(BatchReport(len(flat), seconds, tokens, len(errors), errors[0] if errors else None))
