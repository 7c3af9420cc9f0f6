"""The scorer in its own process, so the HTTP front end never waits for the model's GIL.

In one process, the event loop (HTTP parsing, JSON, protocol handling) and the scorer's
Python work (tokenization, batch planning, the forward pass's Python side) take turns on
one GIL: with a small model the front end starves, batches stay small and cross-request
batching loses to scoring requests one by one. :class:`ProcessScorer` runs the scorer in a
child process (``spawn``: a fresh interpreter, safe with CUDA) and talks to it over a pipe:
samples go in, :class:`~worldpm_reward.samples.ScoreResult` lists come back (both pickled).
The child builds the scorer from a picklable factory, e.g.
``functools.partial(RewardModel.from_pretrained, path, model_config)``. If the child dies
(killed, out of memory), the call that saw it fails, ``alive`` turns False (``/health``
answers 503), and the next call starts a new child. A scorer whose ``alive`` turns False
(the vLLM engine whose server died) makes its child exit after answering, and a new child
is started at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from worldpm_reward.errors import WorldPMRewardError
from worldpm_reward.samples import Scorer, ScoreResult

logger = logging.getLogger(__name__)


class ScorerProcessError(WorldPMRewardError):
    """The scorer process could not be started, or died while scoring."""


def _child(factory: Callable[[], Scorer], conn: Any) -> None:
    try:
        scorer = factory()
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", type(scorer).__name__))
    try:
        while True:
            try:
                samples = conn.recv()
            except EOFError:  # the parent went away
                return
            if samples is None:
                return
            try:
                results = scorer.score_detailed(samples)
            except Exception as exc:  # the batch failed as a whole; the parent raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            if getattr(scorer, "alive", True):
                conn.send(("ok", results))
            else:  # e.g. its vLLM died: answer, then exit so that the parent starts a fresh one
                conn.send(("ok, restart me", results))
                return
    finally:
        close = getattr(scorer, "close", None)
        if close is not None:  # e.g. stop a launched vLLM
            close()


class ProcessScorer:
    """A scorer (``score_detailed``) that runs ``factory()``'s scorer in a child process.

    Args:
        factory: a picklable zero-argument callable that builds the scorer (it runs in the child).
        name: the child process's name.
    """

    def __init__(self, factory: Callable[[], Scorer], *, name: str = "worldpm-scorer") -> None:
        self.factory = factory
        self.name = name
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(self.factory, child), name=self.name, daemon=True)
        proc.start()
        child.close()
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise ScorerProcessError(
                f"the scorer process exited while loading (exit code {proc.exitcode})"
            ) from None
        if kind != "ready":
            proc.join(5)
            raise ScorerProcessError(f"loading the scorer failed in its process: {payload}")
        self._proc, self._conn = proc, parent
        logger.info("scorer %s running in process %d", payload, proc.pid)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _restart(self, wait_exit_s: float = 0.0) -> None:
        """Start a new child once the old one is gone (waiting up to ``wait_exit_s`` for one
        that is exiting by itself, then killing it); a failed start is retried by the next call."""
        with self._lock:
            if self._proc is not None and wait_exit_s > 0:
                self._proc.join(wait_exit_s)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(5)
            with contextlib.suppress(Exception):
                self._restart_locked()

    def _restart_locked(self) -> None:
        if self.alive:
            return
        self.restarts += 1
        logger.warning("the scorer process is gone; starting a new one (restart %d)", self.restarts)
        self._start()

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        with self._lock:
            self._restart_locked()
            try:
                self._conn.send(list(samples))
                kind, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._proc.join(1)
                code = self._proc.exitcode
                threading.Thread(target=self._restart, name="worldpm-scorer-restart", daemon=True).start()
                raise ScorerProcessError(
                    f"the scorer process died while scoring (exit code {code}): {exc}"
                ) from None
        if kind == "ok, restart me":
            logger.warning("the scorer lost its engine; restarting the scorer process")
            threading.Thread(
                target=self._restart, args=(60.0,), name="worldpm-scorer-restart", daemon=True
            ).start()
        elif kind != "ok":
            raise ScorerProcessError(f"scoring failed in the scorer process: {payload}")
        return payload  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the child after the call in progress, if any."""
        with self._lock:
            if self._proc is None:
                return
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._conn.close()
            self._proc = None


__all__ = ["ProcessScorer", "ScorerProcessError"]
