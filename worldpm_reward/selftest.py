"""The checkpoint self-test (``worldpm-reward selftest``): a loaded model against its model
card's published answers, plus sanity checks any checkpoint must pass (a helpful reply
outscores a careless one; a score does not change with its batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SelftestReport:
    """What the self-test found: one line per check, and the verdict."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def check(self, good: bool, line: str) -> None:
        self.ok &= good
        self.lines.append(line)

    @property
    def verdict(self) -> str:
        return (
            "selftest PASSED"
            if self.ok
            else "selftest FAILED: this checkpoint or setup does not reproduce the expected scores"
        )


def run_selftest(rm: Any, model: str, tolerance: float = 0.05) -> SelftestReport:
    """Check ``rm`` (a loaded :class:`~worldpm_reward.scoring.RewardModel` of checkpoint
    ``model``): its scores of the model card's known answers, each within ``tolerance`` or
    the answer's own published precision, whichever is wider; that the family's helpful
    reply outscores its careless one; that a score alone equals it in a batch."""
    from worldpm_reward.families import known_answers_for

    report = SelftestReport()
    if rm.model is None:  # engine="vllm": vLLM holds the weights
        dtype = None
        report.lines.append(
            f"loaded {model} as family={rm.family} on engine=vllm ({type(rm.engine.backend).__name__})"
        )
    else:
        dtype = next(rm.model.parameters()).dtype
        report.lines.append(f"loaded {model} as family={rm.family}, dtype={dtype}, device={rm.device}")
    answers = known_answers_for(model)
    if answers:
        scores = rm.score([a.sample for a in answers])
        for a, s in zip(answers, scores):
            diff = abs(s - a.score)
            # a published value given only approximately ("about -0.57") is judged at its own
            # precision; --tolerance cannot make it more precise than it was published
            tol = max(tolerance, a.tolerance or 0.0)
            good = diff <= tol
            report.check(
                good,
                f"  [{'ok' if good else 'MISMATCH'}] {a.label}: got {s:.6f}, model card {a.score:.6f}, "
                f"|diff| {diff:.4f} (tolerance {tol})",
            )
    else:
        report.lines.append(f"  no published known answers for {model!r}; running sanity checks only")
    pair: list[Any] = list(rm.family_spec.sanity_pair)
    good_score, bad_score = rm.score(pair)
    alone = rm.score(pair[:1])[0]
    finite = math.isfinite(good_score) and math.isfinite(bad_score)
    ranked = finite and good_score > bad_score
    report.check(
        ranked,
        f"  [{'ok' if good_score > bad_score else 'FAIL'}] a helpful reply outscores a careless one: "
        f"{good_score:.4f} > {bad_score:.4f}",
    )
    inv = abs(alone - good_score)
    # fp32 (and vLLM's engine, which resolves dtype itself) agrees closely; half precision less so
    inv_tol = 5e-2 if dtype is not None and dtype != __import__("torch").float32 else 1e-3
    report.check(
        inv <= inv_tol,
        f"  [{'ok' if inv <= inv_tol else 'FAIL'}] same score alone and in a batch: |diff| {inv:.2e}",
    )
    return report


__all__ = ["SelftestReport", "run_selftest"]
