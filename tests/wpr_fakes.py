"""Small scorers for fault injection, importable by a spawned scorer process (no torch).

Each scores a sample by the length of its reply, so results are checkable by hand; a reply
that names a fault triggers it: "HANG" sleeps (a hung call), "INF"/"NAN" return a
non-finite score, "SLOW" takes ``slow_s`` seconds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worldpm_reward.samples import ScoreResult, parse_sample


def expected_score(reply: str) -> float:
    return float(len(reply)) / 10.0


class FaultyScorer:
    def __init__(self, slow_s: float = 2.0) -> None:
        self.slow_s = slow_s
        self.pid = os.getpid()

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        out = []
        for i, s in enumerate(samples):
            try:
                reply = parse_sample(s, i).response
            except Exception as exc:
                out.append(ScoreResult(error=str(exc)))
                continue
            if "HANG" in reply:
                time.sleep(3600)
            if "SLOW" in reply:
                time.sleep(self.slow_s)
            score = expected_score(reply)
            if "INF" in reply:
                score = math.inf
            elif "NAN" in reply:
                score = math.nan
            out.append(ScoreResult(score=score, num_tokens=len(reply)))
        return out


def make_faulty(slow_s: float = 2.0) -> FaultyScorer:
    return FaultyScorer(slow_s)


def make_unless_marker(marker: str, slow_s: float = 2.0) -> FaultyScorer:
    """A factory that fails (as a broken restart would) once ``marker`` exists."""
    if Path(marker).exists():
        raise RuntimeError(f"cannot load: the GPU is gone (marker {marker})")
    return FaultyScorer(slow_s)


class MortalScorer(FaultyScorer):
    """A scorer with an engine that can die while idle, as a launched vLLM does: ``alive`` turns
    False once the file ``{marker}.{pid}`` exists; ``close`` leaves ``{marker}.closed.{pid}``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    @property
    def alive(self) -> bool:
        return not Path(f"{self.marker}.{self.pid}").exists()

    def close(self) -> None:
        Path(f"{self.marker}.closed.{self.pid}").touch()


def make_mortal(marker: str) -> MortalScorer:
    return MortalScorer(marker)


def conv(reply: str, prompt: str = "Say something.") -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


class FnScorer:
    """A plain ``samples -> results`` function as a sync Scorer (what the batcher wraps)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        return self.fn(samples)
