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

from worldpm_reward.errors import ConfigError


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
        raise ConfigError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be positive, got {max_batch_size}")
    if not 0.0 <= max_padding_fraction <= 1.0:
        raise ConfigError(f"max_padding_fraction must be within [0, 1], got {max_padding_fraction}")
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
        raise ConfigError(f"min_prefix must be >= 1 and min_group >= 2; got {min_prefix}, {min_group}")
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


def plan_packed(
    lengths: Sequence[int],
    max_batch_tokens: int,
    row_tokens: int,
    max_batch_size: int | None = None,
    counts: Sequence[int] | None = None,
    max_padding_fraction: float = 1.0,
) -> list[list[list[int]]]:
    """Pack items (sequences, or shared-prefix blocks) into rows, and rows into micro-batches.

    Args:
        lengths: positions each item takes in a row.
        max_batch_tokens: budget of computed positions per micro-batch (rows x row width).
        row_tokens: the width rows are packed to; a micro-batch whose longest item is longer
            gets rows that long. Attention within a packed row costs width^2, so rows much
            longer than the sequences in them waste attention work.
        max_batch_size: most scored sequences per micro-batch, or None for no limit.
        counts: sequences each item scores (1 each when None).
        max_padding_fraction: a micro-batch is cut before the padding at the ends of its rows
            (each row is as wide as its first, longest one) would exceed this share of its
            computed positions: a shared-prefix row or a long sequence wider than
            ``row_tokens`` then runs with few or no narrower rows instead of padding them.
    Returns:
        micro-batches, each a list of rows, each a list of indices into ``lengths``; every
        index appears exactly once. Items are placed longest first, each in the fullest row
        that has room for it (best-fit decreasing), so rows end nearly full; rows are then
        cut into micro-batches longest first, so the first row of a micro-batch is its
        longest.
    """
    if max_batch_tokens < 1 or row_tokens < 1:
        raise ConfigError(
            f"max_batch_tokens and row_tokens must be positive, got {max_batch_tokens}, {row_tokens}"
        )
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be positive, got {max_batch_size}")
    if not 0.0 <= max_padding_fraction <= 1.0:
        raise ConfigError(f"max_padding_fraction must be within [0, 1], got {max_padding_fraction}")
    counts = counts if counts is not None else [1] * len(lengths)
    # 1. rows: best-fit decreasing over all items (a row opened by an item longer than
    #    row_tokens is that long), at most max_batch_size sequences per row
    rows: list[list[int]] = []
    room: list[int] = []
    held: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n, c = lengths[i], counts[i]
        best = None
        for r, left in enumerate(room):
            fits = n <= left and (max_batch_size is None or held[r] + c <= max_batch_size)
            if fits and (best is None or left < room[best]):
                best = r
        if best is None:
            rows.append([])
            room.append(max(row_tokens, n))
            held.append(0)
            best = len(rows) - 1
        rows[best].append(i)
        room[best] -= n
        held[best] += c
    # 2. micro-batches: rows longest first, as many as the budget holds at the longest's width
    used = [sum(lengths[i] for i in row) for row in rows]
    batches: list[list[list[int]]] = []
    width = sequences = padding = 0
    for r in sorted(range(len(rows)), key=lambda r: (-used[r], r)):
        if batches and (
            (len(batches[-1]) + 1) * width > max_batch_tokens
            or (max_batch_size is not None and sequences + held[r] > max_batch_size)
            or padding + width - used[r] > max_padding_fraction * (len(batches[-1]) + 1) * width
        ):
            batches.append([])
        if not batches:
            batches.append([])
        if not batches[-1]:
            width, sequences, padding = used[r], 0, 0
        batches[-1].append(rows[r])
        sequences += held[r]
        padding += width - used[r]
    return batches


def split_group(
    prefix: int, suffixes: Sequence[int], capacity: int, max_size: int | None = None
) -> list[list[int]]:
    """Split a shared-prefix group's suffixes into chunks that each run after one copy of the
    prefix in one row: ``prefix + sum(chunk) <= capacity`` (a chunk holds at least one
    suffix) and at most ``max_size`` suffixes per chunk. Returns lists of indices into
    ``suffixes``, longest first."""
    order = sorted(range(len(suffixes)), key=lambda j: (-suffixes[j], j))
    chunks: list[list[int]] = []
    used = 0
    for j in order:
        if chunks and used + suffixes[j] <= capacity and (max_size is None or len(chunks[-1]) < max_size):
            chunks[-1].append(j)
            used += suffixes[j]
        else:
            chunks.append([j])
            used = prefix + suffixes[j]
    return chunks
