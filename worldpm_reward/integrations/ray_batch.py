"""Ray Serve's batching as an :class:`~worldpm_reward.samples.AsyncScorer`: every request of a
replica (HTTP or handle) scores through one ``@serve.batch`` method, one sample per batch
slot, so concurrent requests share model calls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from worldpm_reward.errors import require_extra
from worldpm_reward.samples import Scorer, ScoreResult

serve = require_extra("ray.serve", "ray")


class ServeBatchScorer:
    """An AsyncScorer around a sync scorer, batched by ``@serve.batch``.

    ``fatal`` holds the first whole-batch failure (a CUDA error, a lost device; never a bad
    sample), for the replica's health check."""

    def __init__(
        self, scorer: Scorer, max_batch_size: int = 256, batch_wait_timeout_s: float = 0.005
    ) -> None:
        self.scorer = scorer
        # one @serve.batch queue per instance: decorating the method on the class would share one
        # queue among every instance in the process (Ray runs a batch with its first caller's self)
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
            self._score_batch
        )
        self.batch_calls = 0
        self.batched_samples = 0
        self.fatal: str | None = None

    @property
    def alive(self) -> bool:
        return getattr(self.scorer, "alive", True)

    async def _score_batch(self, samples: list[Any]) -> list[ScoreResult]:
        self.batch_calls += 1
        self.batched_samples += len(samples)
        try:
            return await asyncio.to_thread(self.scorer.score_detailed, samples)
        except Exception as exc:  # score_detailed never raises for a bad sample: the model is broken
            self.fatal = f"{type(exc).__name__}: {exc}"
            raise

    async def ascore_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        return list(await asyncio.gather(*(self._batched(s) for s in samples)))

    def close(self) -> None:
        """Release the scorer's own resources (e.g. the vLLM a RewardModel launched)."""
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()


__all__ = ["ServeBatchScorer"]
