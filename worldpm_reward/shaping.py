"""Reward shaping: normalization, clipping and reference-relative rewards.

Configured by one typed :class:`ShapingConfig` and applied by :class:`RewardShaper`, the
same for every adapter (TRL, HTTP server, Ray, OpenRLHF). Raw model scores are always
kept next to the shaped rewards for logging.

Order of operations, per batch:
  1. reference-relative (optional): ``raw - raw_reference`` ("difference", a log-odds
     under Bradley-Terry) or ``sigmoid(raw - raw_reference)`` ("bt_probability", the
     modelled probability that the response beats the reference, in (0, 1));
  2. group win rate (optional, ``group="bt_winrate"``): within each group of samples that
     share a prompt (a GRPO/RLOO group), each sample's mean Bradley-Terry probability of
     beating each other member, ``mean_j sigmoid(s_i - s_j)``, in (0, 1); a group with one
     scorable member gets 0.5. Invariant to the reward model's offset, and bounded;
  3. normalization (optional): "running" (Welford mean/std over everything seen, merged
     exactly across processes) or "fixed" (mean/std from a calibration file written by
     ``worldpm-reward calibrate``, or given directly): ``(x - mean) / (std + eps)``;
  4. clipping (optional) to ``[clip_min, clip_max]``.
A sample that could not be scored stays None throughout; it never gets a made-up number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from worldpm_reward.errors import ConfigError, StateFileError

logger = logging.getLogger(__name__)

Normalize = Literal["none", "running", "fixed"]
ReferenceMode = Literal["none", "difference", "bt_probability"]
GroupMode = Literal["none", "bt_winrate"]


@dataclass
class ShapingConfig:
    """How raw reward-model scores become training rewards.

    Attributes:
        normalize: "none", "running" (Welford mean/std of all values seen so far,
            including the current batch) or "fixed" (``mean``/``std`` or ``calibration_file``).
        mean: fixed mean (normalize="fixed"), in the units of step 1's output.
        std: fixed standard deviation (normalize="fixed").
        calibration_file: JSON written by ``worldpm-reward calibrate`` (gives mean and std).
        clip_min: lower bound of the final reward, or None.
        clip_max: upper bound of the final reward, or None.
        reference: "none", "difference" or "bt_probability" (needs a reference answer per sample).
        reference_field: dataset column / request field that holds the reference answer.
        group: "none" or "bt_winrate" (each sample's mean sigmoid(s_i - s_j) over the other
            samples with the same prompt in the batch).
        sync_across_processes: merge running statistics across torch.distributed ranks.
        state_file: normalize="running": keep the statistics in this JSON file: read at start
            (a restart continues where it stopped) and merged into under a file lock every
            ``state_sync_s`` seconds and at shutdown. Several processes (server replicas on a
            shared filesystem) given the same file share one set of statistics: each adds
            what it saw since its last merge and adopts the total. With torch.distributed
            only rank 0 writes it (the ranks' statistics are already merged).
            The file is validated when read (finite, non-negative, consistent, right types):
            a bad one is refused with an error naming the file and the field. A merge that
            fails (lock held too long, unreadable file, read-only directory) is logged and
            counted (``RewardShaper.sync_failures``) and retried at the next merge; a file
            deleted while running is written again from the full statistics.
        state_sync_s: seconds between merges into ``state_file`` (0: after every batch).
        state_model: the identity of the model whose scores are normalized (family and
            checkpoint); recorded in ``state_file``, and a file recorded for another model is
            refused (statistics of two models must never be merged). None: not checked.
        state_reset: a ``state_file`` that is invalid or another model's is set aside (renamed
            ``<file>.bad-<time>``) with a warning and the statistics start over, instead of refusing.
        state_lock_timeout_s: most seconds to wait for the state file's lock.
        eps: added to std to avoid division by zero.
    """

    normalize: Normalize = "none"
    mean: float | None = None
    std: float | None = None
    calibration_file: str | None = None
    clip_min: float | None = None
    clip_max: float | None = None
    reference: ReferenceMode = "none"
    reference_field: str = "reference"
    group: GroupMode = "none"
    sync_across_processes: bool = True
    state_file: str | None = None
    state_sync_s: float = 5.0
    state_model: str | None = None
    state_reset: bool = False
    state_lock_timeout_s: float = 10.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.normalize not in ("none", "running", "fixed"):
            raise ConfigError(
                f"shaping.normalize must be 'none', 'running' or 'fixed'; got {self.normalize!r}"
            )
        if self.reference not in ("none", "difference", "bt_probability"):
            raise ConfigError(
                f"shaping.reference must be 'none', 'difference' or 'bt_probability'; got {self.reference!r}"
            )
        if self.group not in ("none", "bt_winrate"):
            raise ConfigError(f"shaping.group must be 'none' or 'bt_winrate'; got {self.group!r}")
        if self.normalize == "fixed":
            if self.calibration_file is not None:
                calib = read_calibration(self.calibration_file)
                self.mean = calib.mean if self.mean is None else self.mean
                self.std = calib.std if self.std is None else self.std
            if self.mean is None or self.std is None:
                raise ConfigError(
                    "shaping.normalize='fixed' needs shaping.mean and shaping.std, or shaping.calibration_file "
                    "(write one with: worldpm-reward calibrate --model M DATA.jsonl -o calib.json)"
                )
            if not self.std > 0:
                raise ConfigError(f"shaping.std must be positive; got {self.std!r}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ConfigError(
                f"shaping.clip_min ({self.clip_min}) must not exceed shaping.clip_max ({self.clip_max})"
            )

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"


@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations (Welford), exactly mergeable (Chan et al.)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def update(self, values: Sequence[float]) -> None:
        bad = [x for x in values if not math.isfinite(x)]
        if bad:
            raise ValueError(f"running statistics take finite values only; got {bad[0]!r}")
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def merge(self, other: RunningStats) -> RunningStats:
        """The statistics of both data sets together (a new object)."""
        n = self.count + other.count
        if n == 0:
            return RunningStats()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return RunningStats(n, mean, m2)

    @classmethod
    def of(cls, values: Sequence[float]) -> RunningStats:
        stats = cls()
        stats.update(values)
        return stats


def _all_gather_stats(local: RunningStats) -> RunningStats:
    """Merge one batch's statistics over all torch.distributed ranks (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local.count, local.mean, local.m2))
    total = RunningStats()
    for count, mean, m2 in gathered:
        total = total.merge(RunningStats(count, mean, m2))
    return total


@dataclass
class Shaped:
    """Shaped rewards and what they came from; all lists in input order, None = unscorable."""

    rewards: list[float | None]
    raw: list[float | None]
    reference_raw: list[float | None] | None = None


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def group_win_rates(values: Sequence[float | None], groups: Sequence[Hashable]) -> list[float | None]:
    """Each value's mean Bradley-Terry win probability against the other scored values of its
    group: ``mean_{j != i} sigmoid(v_i - v_j)``; 0.5 alone in its group; None stays None."""
    members: dict[Hashable, list[int]] = {}
    for i, (v, g) in enumerate(zip(values, groups)):
        if v is not None:
            members.setdefault(g, []).append(i)
    out: list[float | None] = [None] * len(values)
    for idx in members.values():
        for i in idx:
            vi = values[i]
            assert vi is not None
            others = [values[j] for j in idx if j != i]
            out[i] = sum(sigmoid(vi - vj) for vj in others if vj is not None) / len(others) if others else 0.5
    return out


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


class RewardShaper:
    """Applies a :class:`ShapingConfig` batch by batch; keeps the running statistics.

    ``background_sync``: merges into the state file run in a background thread (the server
    sets it, so file I/O and locking never block its event loop); otherwise in the caller's."""

    def __init__(self, config: ShapingConfig | None = None, *, background_sync: bool = False) -> None:
        self.config = config or ShapingConfig()
        self.stats = RunningStats()
        self._unsynced = RunningStats()  # seen here since the last merge into the state file
        self._synced_at = -math.inf
        self._lock = threading.Lock()  # stats / _unsynced, shared with a background merge
        self._file_lock = threading.Lock()  # one merge at a time
        self._syncing: threading.Thread | None = None
        self._file_seen = False
        self.background_sync = background_sync
        self.sync_failures = 0
        self.last_sync_error: str | None = None
        if self.config.state_file and self.config.normalize == "running":
            self._synced_at = time.monotonic()
            self._merge(initial=True)  # a bad file is refused here (StateFileError)

    def __call__(
        self,
        raw: Sequence[float | None],
        reference_raw: Sequence[float | None] | None = None,
        groups: Sequence[Hashable] | None = None,
    ) -> Shaped:
        """Shape one batch. ``groups``: one key per sample (equal keys = one group, e.g. the
        prompt), needed by ``group="bt_winrate"``."""
        cfg = self.config
        values: list[float | None] = list(raw)
        if cfg.needs_reference:
            if reference_raw is None or len(reference_raw) != len(raw):
                raise ConfigError(
                    f"shaping.reference={cfg.reference!r} needs one reference score per sample "
                    f"(field '{cfg.reference_field}')"
                )
            values = [
                None
                if (r is None or q is None)
                else (r - q if cfg.reference == "difference" else sigmoid(r - q))
                for r, q in zip(raw, reference_raw)
            ]
        if cfg.group == "bt_winrate":
            if groups is None or len(groups) != len(values):
                raise ConfigError("shaping.group='bt_winrate' needs one group key (the prompt) per sample")
            values = group_win_rates(values, groups)
        values = [_finite(v) for v in values]  # a non-finite value never enters the statistics
        present = [v for v in values if v is not None]
        if cfg.normalize == "running":
            batch = RunningStats.of(present)
            if cfg.sync_across_processes:
                batch = _all_gather_stats(batch)
            with self._lock:
                merged = self.stats.merge(batch)
                if math.isfinite(merged.mean) and math.isfinite(merged.m2):
                    self.stats = merged
                    self._unsynced = self._unsynced.merge(batch)
            self.sync()  # in the background: the statistics as they are now
            with self._lock:
                mean, std = self.stats.mean, self.stats.std
        elif cfg.normalize == "fixed":
            mean, std = float(cfg.mean or 0.0), float(cfg.std or 1.0)
        if cfg.normalize != "none":
            values = [None if v is None else _finite((v - mean) / (std + cfg.eps)) for v in values]
        if cfg.clip_min is not None or cfg.clip_max is not None:
            lo = -math.inf if cfg.clip_min is None else cfg.clip_min
            hi = math.inf if cfg.clip_max is None else cfg.clip_max
            values = [None if v is None else min(max(v, lo), hi) for v in values]
        return Shaped(values, list(raw), None if reference_raw is None else list(reference_raw))

    def sync(self, force: bool = False, wait: bool = False) -> None:
        """Merge what this process saw since the last merge into ``state_file`` (under an
        exclusive lock; written atomically) and adopt the file's total. A no-op without a
        state file, or before ``state_sync_s`` has passed unless ``force``. With
        ``background_sync`` the merge runs in a background thread unless ``wait``. A failed
        merge is logged and counted in ``sync_failures``, never raised; what it would have
        added is kept for the next merge (neither lost nor counted twice)."""
        cfg = self.config
        now = time.monotonic()
        if not cfg.state_file or cfg.normalize != "running":
            return
        if not force and now - self._synced_at < cfg.state_sync_s:
            return
        self._synced_at = now
        if self.background_sync and not wait:
            if self._syncing is None or not self._syncing.is_alive():
                self._syncing = threading.Thread(
                    target=self._merge_logged, name="worldpm-state-sync", daemon=True
                )
                self._syncing.start()
            return
        self._merge_logged()

    def _merge_logged(self) -> None:
        try:
            self._merge(initial=False)
        except Exception as exc:  # a persistence failure never fails scoring
            self.sync_failures += 1
            self.last_sync_error = str(exc)
            logger.error("merging the running statistics into the state file failed (will retry): %s", exc)

    def _merge(self, initial: bool) -> None:
        cfg = self.config
        assert cfg.state_file is not None
        path = cfg.state_file
        writer = _is_rank_zero()
        with self._file_lock:
            with self._lock:
                pending, self._unsynced = self._unsynced, RunningStats()
                known = self.stats  # includes pending
            try:
                with _locked(path, cfg.state_lock_timeout_s):
                    try:
                        found = _read_state(path, cfg.state_model)
                    except StateFileError as exc:
                        if not (initial and cfg.state_reset):
                            raise
                        aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
                        os.replace(path, aside)
                        logger.warning("%s; moved it to %s and starting the statistics over", exc, aside)
                        found = None
                    if not writer:  # other ranks: read once at start, then follow their own merged stats
                        with self._lock:
                            if initial and found is not None:
                                self.stats = found
                            self._unsynced = RunningStats()
                        return
                    if found is None and self._file_seen:
                        logger.warning(
                            "the state file %s was deleted while running; writing it again from the full "
                            "statistics (%d values)",
                            path,
                            known.count,
                        )
                        total = known
                    else:
                        total = (found or RunningStats()).merge(pending)
                    if pending.count or (found is None and total.count):
                        write_stats(path, total, model=cfg.state_model)
            except BaseException:
                with self._lock:  # kept for the next merge
                    self._unsynced = pending.merge(self._unsynced)
                raise
            self._file_seen = True
            with self._lock:
                self.stats = total.merge(self._unsynced)  # plus what arrived meanwhile

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.stats)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = _validated(state, "checkpointed shaper state", None)


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _locked(path: str, timeout_s: float = 10.0) -> Iterator[None]:
    """An exclusive advisory lock on ``path + ".lock"`` (POSIX flock), waited for at most
    ``timeout_s`` (then StateFileError)."""
    import fcntl

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{path}.lock", "a")  # noqa: SIM115
    except OSError as exc:
        raise StateFileError(f"shaping.state_file {path!r}: cannot open its lock file: {exc}") from None
    with handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateFileError(
                        f"shaping.state_file {path!r}: its lock ({path}.lock) is held by another process for "
                        f"more than {timeout_s:g} s (a stopped replica, a stalled filesystem?)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_FIX = "fix or delete the file, or start with --normalize-state-reset (shaping.state_reset) to start over"


def _number(data: dict[str, Any], key: str, where: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StateFileError(
            f"{where}: field '{key}' must be a finite number; got {str(value)[:40]!r}; {_FIX}"
        )
    return float(value)


def _validated(data: Any, where: str, model: str | None) -> RunningStats:
    """The statistics in ``data``, checked: right types, finite, non-negative, consistent."""
    if not isinstance(data, dict):
        raise StateFileError(f"{where} is not a statistics file (expected a JSON object); {_FIX}")
    for key in ("count", "mean", "m2"):
        if key not in data:
            raise StateFileError(f"{where}: field '{key}' is missing; {_FIX}")
    count = data["count"]
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 2**53:
        raise StateFileError(
            f"{where}: field 'count' must be a whole number from 0 to 2**53; got {str(count)[:40]!r}; {_FIX}"
        )
    mean, m2 = _number(data, "mean", where), _number(data, "m2", where)
    if m2 < 0:
        raise StateFileError(f"{where}: field 'm2' must not be negative; got {m2!r}; {_FIX}")
    if count == 0 and (mean != 0 or m2 != 0):
        raise StateFileError(f"{where}: field 'count' is 0 but mean={mean!r}, m2={m2!r}; {_FIX}")
    recorded = data.get("model")
    if model is not None and recorded is not None and recorded != model:
        raise StateFileError(
            f"{where}: field 'model' is {str(recorded)[:200]!r}, but these statistics are for {model!r}; "
            "the statistics of two models must not be merged (give each model its own file)"
        )
    return RunningStats(count, mean, m2)


def _read_state(path: str | os.PathLike[str], model: str | None = None) -> RunningStats | None:
    """The validated statistics in a state file; None if it does not exist."""
    where = f"shaping.state_file {str(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateFileError(f"{where} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateFileError(f"{where} is not JSON ({exc}); {_FIX}") from None
    return _validated(data, where, model)


def read_stats(path: str | os.PathLike[str], model: str | None = None) -> RunningStats:
    """Validated running statistics from a state file (StateFileError names the field when
    it is not valid, or recorded for another ``model``); empty if the file does not exist yet."""
    return _read_state(path, model) or RunningStats()


def write_stats(path: str | os.PathLike[str], stats: RunningStats, model: str | None = None) -> None:
    """Write atomically (a temporary file renamed over the old one); ``model`` is recorded."""
    if not (math.isfinite(stats.mean) and math.isfinite(stats.m2)):
        raise StateFileError(f"refusing to write non-finite statistics to {str(path)!r}: {stats}")
    body: dict[str, Any] = {**asdict(stats), "std": stats.std}
    if model is not None:
        body["model"] = model
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(body, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateFileError(f"shaping.state_file {str(path)!r} cannot be written: {exc}") from None


@dataclass(frozen=True)
class Calibration:
    """Mean and std of raw scores of one model on one data set (``worldpm-reward calibrate``)."""

    mean: float
    std: float
    count: int
    model: str = ""
    data: str = ""
    created: str = ""


def write_calibration(
    path: str | os.PathLike[str], stats: RunningStats, *, model: str, data: str
) -> Calibration:
    calib = Calibration(
        mean=stats.mean,
        std=stats.std,
        count=stats.count,
        model=model,
        data=data,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    Path(path).write_text(json.dumps(asdict(calib), indent=2) + "\n", encoding="utf-8")
    return calib


def read_calibration(path: str | os.PathLike[str]) -> Calibration:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"shaping.calibration_file {str(path)!r} cannot be read as JSON: {exc}") from exc
    missing = [k for k in ("mean", "std", "count") if k not in data]
    if missing:
        raise ConfigError(
            f"shaping.calibration_file {str(path)!r} lacks {missing}; write it with worldpm-reward calibrate"
        )
    return Calibration(**{k: data[k] for k in Calibration.__dataclass_fields__ if k in data})
