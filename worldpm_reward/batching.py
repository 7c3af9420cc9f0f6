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
    lengths: Sequence[int],
    max_batch_tokens: int,
    max_batch_size: int | None = None,
    max_padding_fraction: float = 1.0,
) -> list[list[int]]:
    """Group sample indices into micro-batches.

    Args:
        lengths: token count of each sample.
        max_batch_tokens: budget of padded tokens per micro-batch (rows x longest row).
        max_batch_size: most rows per micro-batch, or None for no limit.
        max_padding_fraction: a batch is cut before its padded positions would exceed
            this share of its computed positions. On a CPU every padded position costs
            as much as a real one, so small values pay; on a GPU padding is nearly free.
    Returns:
        lists of indices into ``lengths``; every index appears exactly once; within a
        batch the first index is the longest sample.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    if not 0.0 <= max_padding_fraction <= 1.0:
        raise ValueError(f"max_padding_fraction must be within [0, 1], got {max_padding_fraction}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            longest = lengths[current[0]]
            computed = (len(current) + 1) * longest
            full = max_batch_size is not None and len(current) >= max_batch_size
            padded = 1.0 - (real + lengths[i]) / computed > max_padding_fraction
            if full or padded or computed > max_batch_tokens:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of computed positions that are padding (0.0 = none) for a batch plan."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if computed == 0 else 1.0 - real / computed
