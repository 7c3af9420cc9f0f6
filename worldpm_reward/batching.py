"""Plan micro-batches under a token budget so that padding stays small.

Samples are sorted by length (longest first) and cut into consecutive runs whose padded
size ``rows * longest`` stays within ``max_batch_tokens``. Sorting puts similar lengths
together, so few padded tokens are computed; the longest-first order makes an
out-of-memory failure show up on the first batch rather than the last. A sample longer
than the budget runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group sample indices into micro-batches.

    Args:
        lengths: token count of each sample.
        max_batch_tokens: budget of padded tokens per micro-batch (rows x longest row).
        max_batch_size: most rows per micro-batch, or None for no limit.
    Returns:
        lists of indices into ``lengths``; every index appears exactly once; within a
        batch the first index is the longest sample.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current:
            longest = lengths[current[0]]
            full = max_batch_size is not None and len(current) >= max_batch_size
            if full or (len(current) + 1) * longest > max_batch_tokens:
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of computed positions that are padding (0.0 = none) for a batch plan."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if computed == 0 else 1.0 - real / computed
