"""Scorer + shaping: samples in, training rewards out. The one verb every adapter calls.

:class:`RewardFunction` scores a batch with any :class:`~worldpm_reward.samples.Scorer`
(in-process model, scorer process, remote client) or, from :meth:`RewardFunction.acall`,
any :class:`~worldpm_reward.samples.AsyncScorer` (the cross-call batcher, Ray Serve's batch
method). Each sample is parsed here once; a sample that does not parse is not sent to the
scorer (its result carries the error). It scores the reference answers when the shaping asks
for reference-relative rewards (each distinct prompt + reference scored once, in the same
call as the responses), and applies :class:`~worldpm_reward.shaping.RewardShaper`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worldpm_reward.errors import ConfigError, SampleError
from worldpm_reward.samples import (
    AsyncScorer,
    Sample,
    SampleLike,
    Scorer,
    ScoreResult,
    finite_or_error,
    parse_sample,
    reference_text,
)
from worldpm_reward.shaping import RewardShaper, ShapingConfig

_SAMPLE_NUMBER = re.compile(r"^sample \d+(?=[,:])")


def renumbered(error: str, index: int) -> str:
    """``error`` (a scorer's "sample N, ..." message) naming the caller's sample ``index``:
    a scorer numbers the samples it was given, which may be fewer than the caller's."""
    return _SAMPLE_NUMBER.sub(f"sample {index}", error, count=1)


@dataclass
class RewardBatch:
    """Rewards for one batch, in input order.

    Attributes:
        rewards: shaped rewards (None where a sample could not be scored).
        raw: the reward model's raw scores (None where unscorable).
        results: the per-sample scoring results (token counts, truncation, errors).
    """

    rewards: list[float | None]
    raw: list[float | None]
    results: list[ScoreResult]

    @property
    def errors(self) -> list[tuple[int, str]]:
        return [(i, r.error) for i, r in enumerate(self.results) if r.error is not None]


@dataclass
class RewardResult(ScoreResult):
    """A :class:`ScoreResult` (``score``: the raw score) with its shaped ``reward`` (None
    where the sample could not be scored)."""

    reward: float | None = None


class RewardFunction:
    """Turns samples into shaped rewards with a scorer. Thread-safe for concurrent calls
    only if the scorer is; the running statistics are updated under the caller's order.

    :meth:`score_detailed` makes it a sync :class:`~worldpm_reward.samples.Scorer` of shaped
    results (the veRL adapter batches calls with it)."""

    def __init__(self, scorer: Scorer | AsyncScorer, shaping: ShapingConfig | None = None) -> None:
        self.scorer = scorer
        self.shaper = RewardShaper(shaping)
        self._lock = threading.Lock()

    @property
    def shaping(self) -> ShapingConfig:
        return self.shaper.config

    def __call__(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None = None
    ) -> RewardBatch:
        parsed, to_score, ref_keys = self._prepare(samples, references)
        if not isinstance(self.scorer, Scorer):
            raise ConfigError(
                f"{type(self.scorer).__name__} scores asynchronously only; await RewardFunction.acall"
            )
        results = self.scorer.score_detailed(to_score) if to_score else []
        return self._finish(parsed, results, ref_keys)

    def score_detailed(self, samples: Sequence[SampleLike]) -> list[ScoreResult]:
        """Score and shape ``samples`` as one batch (calls are serialized: the shaper's
        statistics are shared): one :class:`RewardResult` per sample, in input order."""
        with self._lock:
            batch = self(samples)
        return [
            RewardResult(
                score=raw,
                num_tokens=r.num_tokens,
                truncated=r.truncated,
                num_truncated_tokens=r.num_truncated_tokens,
                response_truncated=r.response_truncated,
                error=r.error,
                reward=reward,
            )
            for raw, reward, r in zip(batch.raw, batch.rewards, batch.results)
        ]

    async def acall(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None = None
    ) -> RewardBatch:
        """Async form: awaits an async scorer (``ascore_detailed``), else runs in a worker thread."""
        parsed, to_score, ref_keys = self._prepare(samples, references)
        if not to_score:
            results: list[ScoreResult] = []
        elif isinstance(self.scorer, AsyncScorer):
            results = await self.scorer.ascore_detailed(to_score)
        else:
            results = await asyncio.to_thread(self.scorer.score_detailed, to_score)
        return self._finish(parsed, results, ref_keys)

    # -- internals -------------------------------------------------------------------
    def _prepare(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None
    ) -> tuple[list[Sample | SampleError], list[Any], list[int | str | None]]:
        """Validate samples (a :class:`Sample` or :class:`SampleError` is taken as already
        parsed); the valid ones are scored, then each distinct reference conversation once."""
        if references is not None and len(references) != len(samples):
            raise ConfigError(f"got {len(references)} references for {len(samples)} samples")
        parsed: list[Sample | SampleError] = []
        for i, s in enumerate(samples):
            if isinstance(s, SampleError):
                parsed.append(s)
                continue
            try:
                parsed.append(parse_sample(s, i))
            except SampleError as exc:
                parsed.append(exc)
        to_score: list[Any] = [p for p in parsed if isinstance(p, Sample)]
        ref_keys: list[int | str | None] = [None] * len(samples)
        if self.shaping.needs_reference:
            seen: dict[str, int] = {}
            for i, p in enumerate(parsed):
                if not isinstance(p, Sample):
                    continue
                ref = references[i] if references is not None else p.reference
                if ref is None or (isinstance(ref, str) and not ref.strip()):
                    continue
                try:
                    ref = reference_text(ref, i, self.shaping.reference_field)
                except SampleError as exc:
                    ref_keys[i] = str(exc)  # this sample's error; the others are untouched
                    continue
                conv = [*p.prompt_messages, {"role": "assistant", "content": ref}]
                key = json.dumps(conv, ensure_ascii=False)
                if key not in seen:
                    seen[key] = len(seen)  # its place after the samples' own results
                    to_score.append(conv)
                ref_keys[i] = seen[key]
        return parsed, to_score, ref_keys

    def _finish(
        self, parsed: list[Sample | SampleError], results: list[ScoreResult], ref_keys: list[int | str | None]
    ) -> RewardBatch:
        finite_or_error(results, None)  # whatever the scorer: a non-finite score is that sample's error
        scored = iter(results)
        own = [next(scored) if isinstance(p, Sample) else ScoreResult(error=str(p)) for p in parsed]
        for i, r in enumerate(own):  # the scorer numbered what it was given: say the caller's number
            if r.error is not None and isinstance(parsed[i], Sample):
                r.error = renumbered(r.error, i)
        n_scored = sum(isinstance(p, Sample) for p in parsed)
        raw = [r.score if r.error is None else None for r in own]
        reference_raw: list[float | None] | None = None
        if self.shaping.needs_reference:
            reference_raw = []
            for i, k in enumerate(ref_keys):
                if isinstance(k, str):  # the reference itself was malformed
                    if own[i].error is None:
                        own[i].error = k
                    reference_raw.append(None)
                    continue
                if k is None:
                    if own[i].error is None:
                        own[
                            i
                        ].error = (
                            f"sample {i}, field '{self.shaping.reference_field}': missing reference answer"
                        )
                    reference_raw.append(None)
                    continue
                ref = results[n_scored + k]
                if ref.error is not None and own[i].error is None:
                    own[i].error = f"sample {i}, field '{self.shaping.reference_field}': {ref.error}"
                reference_raw.append(ref.score if ref.error is None else None)
        groups: list[Any] | None = None
        if self.shaping.group != "none":  # a group = the samples of this batch with the same prompt
            groups = [
                json.dumps(p.prompt_messages, ensure_ascii=False) if isinstance(p, Sample) else ("bad", i)
                for i, p in enumerate(parsed)
            ]
        shaped = self.shaper(raw, reference_raw, groups)
        return RewardBatch(shaped.rewards, shaped.raw, own)
