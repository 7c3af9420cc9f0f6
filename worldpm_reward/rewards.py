"""Scorer + shaping: samples in, training rewards out. The one verb every adapter calls.

:class:`RewardFunction` scores a batch with any :class:`~worldpm_reward.samples.Scorer`
(in-process model or remote client), scores the reference answers when the shaping asks
for reference-relative rewards (each distinct prompt + reference scored once, in the same
call as the responses), and applies :class:`~worldpm_reward.shaping.RewardShaper`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worldpm_reward.errors import SampleError
from worldpm_reward.samples import Sample, SampleLike, Scorer, ScoreResult, parse_sample, reference_text
from worldpm_reward.shaping import RewardShaper, ShapingConfig


@dataclass
class RewardBatch:
    """Rewards for one batch, in input order.

    Attributes:
        rewards: shaped rewards (None where a sample could not be scored).
        raw: the reward model's raw scores (None where unscorable).
        reference_raw: raw scores of the reference answers, when used.
        results: the per-sample scoring results (token counts, truncation, errors).
    """

    rewards: list[float | None]
    raw: list[float | None]
    reference_raw: list[float | None] | None
    results: list[ScoreResult]

    @property
    def errors(self) -> list[tuple[int, str]]:
        return [(i, r.error) for i, r in enumerate(self.results) if r.error is not None]


class RewardFunction:
    """Turns samples into shaped rewards with a scorer. Thread-safe for concurrent calls
    only if the scorer is; the running statistics are updated under the caller's order."""

    def __init__(self, scorer: Scorer, shaping: ShapingConfig | None = None) -> None:
        self.scorer = scorer
        self.shaper = RewardShaper(shaping)

    @property
    def shaping(self) -> ShapingConfig:
        return self.shaper.config

    def __call__(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None = None
    ) -> RewardBatch:
        parsed, to_score, ref_keys = self._prepare(samples, references)
        results = self.scorer.score_detailed(to_score)
        return self._finish(parsed, results, ref_keys)

    async def acall(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None = None
    ) -> RewardBatch:
        """Async form: awaits an async scorer (``ascore_detailed``), else runs in a worker thread."""
        parsed, to_score, ref_keys = self._prepare(samples, references)
        ascore = getattr(self.scorer, "ascore_detailed", None)
        if ascore is not None:
            results = await ascore(to_score)
        else:
            results = await asyncio.to_thread(self.scorer.score_detailed, to_score)
        return self._finish(parsed, results, ref_keys)

    # -- internals -------------------------------------------------------------------
    def _prepare(
        self, samples: Sequence[SampleLike], references: Sequence[str | None] | None
    ) -> tuple[list[Sample | SampleError], list[Any], list[int | str | None]]:
        """Validate samples; append each distinct reference conversation once after them."""
        if references is not None and len(references) != len(samples):
            raise ValueError(f"got {len(references)} references for {len(samples)} samples")
        parsed: list[Sample | SampleError] = []
        for i, s in enumerate(samples):
            try:
                parsed.append(parse_sample(s, i))
            except SampleError as exc:
                parsed.append(exc)
        to_score: list[Any] = [p if isinstance(p, Sample) else samples[i] for i, p in enumerate(parsed)]
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
                    seen[key] = len(to_score)
                    to_score.append(conv)
                ref_keys[i] = seen[key]
        return parsed, to_score, ref_keys

    def _finish(
        self, parsed: list[Sample | SampleError], results: list[ScoreResult], ref_keys: list[int | str | None]
    ) -> RewardBatch:
        n = len(parsed)
        own = results[:n]
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
                ref = results[k]
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
        return RewardBatch(shaped.rewards, shaped.raw, reference_raw, own)
