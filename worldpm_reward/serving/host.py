"""What stands behind the reward server's routes: a :class:`~worldpm_reward.serving.protocol.RewardService`
and the life of the scorer it uses (loading, readiness, drain, close).

  * :class:`LocalHost` (``worldpm-reward serve``): a sync scorer (loaded in the background
    from a factory, or given loaded) behind the cross-call
    :class:`~worldpm_reward.batcher.DynamicBatcher`;
  * :class:`ServiceHost` (Ray Serve): a service built by its host around its own
    :class:`~worldpm_reward.samples.AsyncScorer`; no batcher here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from worldpm_reward.batcher import BatchReport, DynamicBatcher
from worldpm_reward.errors import ScorerUnavailableError, ServerClosingError
from worldpm_reward.samples import Scorer, ScoreResult
from worldpm_reward.serving.config import ServerConfig
from worldpm_reward.serving.protocol import RewardService
from worldpm_reward.shaping import ShapingConfig

logger = logging.getLogger(__name__)


class ServiceHost:
    """A service whose scorer its host made (Ray Serve's replica): ready unless closing or
    the scorer says it is not alive."""

    batcher: DynamicBatcher | None = None

    def __init__(self, service: RewardService) -> None:
        self.service = service
        self.error: str | None = None
        self.closing = False

    @property
    def scorer(self) -> Any:
        return self.service.reward.scorer

    def start(self) -> None:
        pass

    async def stop(self, timeout_s: Callable[[float], float | None]) -> None:
        """Not ready from now on; the scorer's own resources (a launched vLLM) are released."""
        self.closing = True
        await _close(self.scorer, timeout_s)


async def _close(scorer: Any, timeout_s: Callable[[float], float | None]) -> None:
    close = getattr(scorer, "close", None)
    if close is None:
        return
    timeout = timeout_s(1.0)
    if timeout is not None and "timeout_s" in inspect.signature(close).parameters:
        await asyncio.to_thread(close, timeout_s=timeout)  # e.g. a ProcessScorer's child process
    else:
        await asyncio.to_thread(close)


class _Loading:
    """Stands in for the scorer while it loads: a request that reaches it is a 503."""

    def score_detailed(self, samples: Any) -> list[ScoreResult]:
        raise ScorerUnavailableError("the reward model is still loading")


class LocalHost(ServiceHost):
    """``worldpm-reward serve``: a sync scorer behind the cross-call batcher.

    Args:
        scorer: a loaded scorer, or a zero-argument factory that loads one; a factory runs
            in a background thread at :meth:`start`, and the host is not ready until it is done.
        config: the batcher's bounds and the service's protocol settings.
        shaping: reward shaping of every request.
        on_batch: called after each model call (the server's metrics).
        on_results / on_unknown_format: see :class:`RewardService`.
    """

    def __init__(
        self,
        scorer: Scorer | Callable[[], Scorer],
        config: ServerConfig,
        shaping: ShapingConfig | None = None,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_results: Callable[[list[ScoreResult]], None] | None = None,
        on_unknown_format: Callable[[int], None] | None = None,
    ) -> None:
        loaded = isinstance(scorer, Scorer)
        self.factory: Callable[[], Scorer] | None = None if loaded else scorer  # type: ignore[assignment]
        self.loaded: Scorer | None = scorer if loaded else None  # type: ignore[assignment]
        self.queue = DynamicBatcher(
            self.loaded or _Loading(),
            max_batch_samples=config.max_batch_samples,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
            max_queue_tokens=config.max_queue_tokens,
            on_batch=on_batch,
            pipeline=True,
            max_batch_tokens=config.max_piece_tokens,
        )
        super().__init__(
            RewardService(
                self.queue,
                shaping=shaping,
                chat_format=config.chat_format,
                reply_turns=config.reply_turns,
                name=config.name,
                max_items=config.max_items,
                fallback_reward=config.fallback_reward,
                scores=config.openrlhf_scores,
                scores_temperature=config.scores_temperature,
                max_request_tokens=config.max_request_tokens,
                on_results=on_results,
                on_unknown_format=on_unknown_format,
            )
        )
        self.batcher = self.queue

    @property
    def scorer(self) -> Any:
        return self.loaded

    def _load(self) -> None:
        assert self.factory is not None
        try:
            loaded = self.factory()
            self.queue.scorer = loaded  # before `loaded`: a request admitted as ready finds the model
            self.loaded = loaded
            logger.info("reward model loaded; serving")
        except Exception as exc:  # reported by /health
            logger.exception("loading the reward model failed")
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        """On the event loop at startup: the batcher's worker, and the loading thread."""
        self.queue.start()
        if self.loaded is None:
            threading.Thread(target=self._load, name="worldpm-load", daemon=True).start()

    async def stop(self, timeout_s: Callable[[float], float | None]) -> None:
        """Finish what is queued, then close the scorer; ``timeout_s(floor)`` says how long is
        left of the drain (None: no bound)."""
        self.closing = True
        try:  # uvicorn stops accepting first; queued work is finished
            await asyncio.wait_for(self.queue.stop(), timeout=timeout_s(0.5))
        except asyncio.TimeoutError:
            logger.error("drain timeout: %d queued samples not scored", self.queue.queued_samples)
            self.queue.abort(ServerClosingError("the reward server shut down before scoring this request"))
        await _close(self.loaded, timeout_s)


__all__ = ["LocalHost", "ServiceHost"]
