"""Plan micro-batches under a token budget so that padding stays small.

Samples are sorted by length (longest first) and cut into consecutive runs whose padded
size ``rows * longest`` stays within ``max_batch_tokens``. Sorting puts similar lengths
together, so few padded tokens are computed; the longest-first order makes an
out-of-memory failure show up on the first batch rather than the last. A sample longer
than the budget runs alone.
"""

from __future__ import annotations

import itertools
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_shared_prefixes(
    sequences: Sequence[Sequence[int]], min_prefix: int, min_group: int = 2
) -> list[tuple[int, list[int]]]:
    """Find groups of sequences that start with the same long run of token ids.

    A GRPO/RLOO group (several completions of one prompt) encodes to sequences that share
    the whole rendered prompt; that prefix needs to run through the model only once.

    Sequences are sorted, so sequences with a common prefix are neighbours and the common
    prefix of a run of neighbours is the smallest common prefix of adjacent pairs. A run is
    either shared as a whole, or split where that smallest prefix occurs (several prompts
    that only share a system message), whichever skips more prefix tokens; the choice is
    made recursively. The shared length is capped one token short of the shortest member,
    so every member keeps its own scored last token.

    Returns:
        (shared prefix length, indices) for each group of at least ``min_group``
        sequences sharing at least ``min_prefix`` tokens; indices in no group are absent.
    """
    if min_prefix < 1 or min_group < 2:
        raise ValueError(f"min_prefix must be >= 1 and min_group >= 2; got {min_prefix}, {min_group}")
    order = sorted(range(len(sequences)), key=lambda i: (list(sequences[i]), i))
    lcp = [_common_prefix(sequences[a], sequences[b]) for a, b in itertools.pairwise(order)]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """(prefix tokens skipped, groups) for the run order[lo:hi]."""
        if hi - lo < min_group:
            return 0, []
        common = min(lcp[lo : hi - 1])
        if common < min_prefix:  # split at the breaks; no group spans them
            cuts = [lo, *(j + 1 for j in range(lo, hi - 1) if lcp[j] < min_prefix), hi]
            parts = [best(a, b) for a, b in itertools.pairwise(cuts)]
            return sum(p[0] for p in parts), [g for p in parts for g in p[1]]
        members = order[lo:hi]
        shared = min(common, min(len(sequences[i]) for i in members) - 1)
        whole = ((hi - lo - 1) * shared, [(shared, members)]) if shared >= min_prefix else (0, [])
        cuts = [lo, *(j + 1 for j in range(lo, hi - 1) if lcp[j] == common), hi]
        if len(cuts) == 2:  # nothing to split at
            return whole
        parts = [best(a, b) for a, b in itertools.pairwise(cuts)]
        split = (sum(p[0] for p in parts), [g for p in parts for g in p[1]])
        return max(whole, split, key=lambda x: x[0])

    return best(0, len(order))[1]
