"""Exceptions raised by worldpm_reward, and the one place that checks optional extras.

Every error says what was found, what was expected and how to fix it. Errors about one
sample of a batch carry its index and the offending field so that a caller can point at
the exact line of its data.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worldpm_reward.samples import ScoreResult


class WorldPMRewardError(Exception):
    """Base class of every error this library raises on purpose."""


class SampleError(WorldPMRewardError, ValueError):
    """One input sample is malformed.

    Attributes:
        index: position of the sample in the batch it came in (None when scored alone).
        field: the offending field, e.g. ``messages[2].role`` or ``response``.
    """

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None) -> None:
        self.index = index
        self.field = field
        self.reason = message
        where = []
        if index is not None:
            where.append(f"sample {index}")
        if field:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ConfigError(WorldPMRewardError, ValueError):
    """A config key or value is not what its dataclass field expects (the message quotes both)."""


class ConfigTypeError(ConfigError, TypeError):
    """An option the API does not take (an unknown keyword option, a config class that is not
    a dataclass); also a TypeError, as Python's own for an unknown keyword argument."""


class CheckpointError(WorldPMRewardError):
    """A checkpoint cannot be loaded faithfully (missing, unexpected or misshaped weights, wrong head)."""


class EngineError(WorldPMRewardError):
    """An external engine (vLLM) could not start, or failed on a batch; the message says which."""


class BatchScoringError(WorldPMRewardError):
    """Raised by the all-or-nothing ``score()`` when some samples could not be scored.

    Nothing is lost: ``results`` holds one :class:`ScoreResult` per input sample, in input
    order, with scores for every sample that could be scored.
    """

    def __init__(self, results: Sequence[ScoreResult]) -> None:
        self.results = list(results)
        failed = [r for r in self.results if r.error is not None]
        shown = "; ".join(r.error or "" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} of {len(self.results)} samples could not be scored: {shown}{more}. "
            "Use score_detailed() to get per-sample results instead of an exception."
        )


class RequestError(WorldPMRewardError):
    """A request the reward service refuses: ``status`` is the HTTP status, ``detail`` names the items."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


class QueueFullError(WorldPMRewardError):
    """The server's queue is full; retry later (HTTP 503 with Retry-After)."""


class ServerClosingError(WorldPMRewardError):
    """The server is shutting down and takes no new work (HTTP 503)."""


class ScorerUnavailableError(WorldPMRewardError):
    """The scorer cannot answer right now (its process hung, died or is restarting): the
    request is answered 503 with ``Retry-After`` and this message, never a bare 500."""


class StateFileError(ConfigError):
    """A running-normalization state file cannot be used (unreadable, invalid, another model's,
    or its lock cannot be taken in time); the message names the file and the field."""


class RemoteScoringError(WorldPMRewardError):
    """Every reward server failed for a request after all retries, or answered nonsense."""


class MissingExtraError(WorldPMRewardError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require_extra(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise a MissingExtraError (an ImportError) naming the
    extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"'{module}' is needed for this feature but is not installed. "
            f"Install it with: pip install 'worldpm-reward[{extra}]'"
        ) from exc
