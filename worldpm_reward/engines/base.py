"""The engine seam: what :class:`~worldpm_reward.scoring.RewardModel` (the engine-neutral
front) asks of whatever runs the forward pass.

The front parses, strips reasoning, encodes (the family's encoder), records per-sample
errors and checks scores are finite; an engine gets the encoded ids of the samples that are
still valid and fills in their scores. How it batches, what it shares between samples and
how it survives running out of memory is the engine's own business. No torch here: the
engines import it, the seam does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from worldpm_reward.config import ModelConfig
    from worldpm_reward.encoder import Encoded, Encoder
    from worldpm_reward.families.base import RewardFamily
    from worldpm_reward.samples import ScoreResult

__all__ = ["BatchStats", "Engine", "EngineClass", "LoadedEngine", "Progress"]

#: Called with the number of samples finished (scored or failed) after each engine step.
Progress = Callable[[int], None]


@dataclass
class BatchStats:
    """Counters of the last ``score_detailed`` call (for logging and benchmarks)."""

    num_samples: int = 0
    num_errors: int = 0
    num_truncated: int = 0
    num_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # positions computed, padding included
    shared_groups: int = 0  # groups whose common prefix ran once
    shared_prefix_tokens: int = 0  # prefix positions NOT computed thanks to that
    num_rows: int = 0  # rows computed (a packed row holds several sequences)

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.real_tokens / self.padded_tokens


@dataclass
class LoadedEngine:
    """What an engine's ``load`` hands the front: the engine, and the checkpoint's tokenizer,
    family and input encoder (whose ``max_length`` the engine was sized for)."""

    engine: Engine
    tokenizer: Any
    family: RewardFamily
    encoder: Encoder


class Engine(Protocol):
    """Encoded ids in, raw scores out. Implemented by
    :class:`~worldpm_reward.engines.transformers.TransformersEngine`,
    :class:`~worldpm_reward.engines.vllm.VLLMEngine` and
    :class:`~worldpm_reward.engines.sharded.ShardedEngine`."""

    #: The torch module holding the weights in this process (None where another process,
    #: e.g. a vLLM server, holds them).
    model: Any

    @property
    def device(self) -> Any:
        """Where input ids go (a ``torch.device``)."""
        ...

    @property
    def alive(self) -> bool:
        """False once the engine can no longer score (a launched vLLM exited)."""
        ...

    def score_encoded(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Progress | None,
        start_index: int,
    ) -> None:
        """Set ``results[i].score`` (or ``results[i].error``, naming sample ``start_index + i``)
        for every ``(i, encoded)`` in ``ready``; add to ``stats``; call ``progress`` with the
        samples finished after each step. Never raises for one sample's failure."""
        ...

    def end_call(self, stats: BatchStats) -> None:
        """Called once at the end of every ``score_detailed`` with its final counters (the
        sharded engine sums them over its ranks)."""
        ...

    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences (each read at its last token), in order."""
        ...

    def close(self) -> None:
        """Release what the engine holds outside this process (a launched server)."""
        ...


class EngineClass(Protocol):
    """A registered engine class (:data:`worldpm_reward.engines.ENGINES`): ``load`` reads a
    checkpoint (with the family's weight checks) and builds the engine."""

    def load(self, name_or_path: str | os.PathLike[str], config: ModelConfig) -> LoadedEngine: ...
