"""The scorer in its own process, so the HTTP front end never waits for the model's GIL.

In one process, the event loop (HTTP parsing, JSON, protocol handling) and the scorer's
Python work (tokenization, batch planning, the forward pass's Python side) take turns on
one GIL: with a small model the front end starves, batches stay small and cross-request
batching loses to scoring requests one by one. :class:`ProcessScorer` runs the scorer in a
child process (``spawn``: a fresh interpreter, safe with CUDA) and talks to it over a pipe:
samples go in, :class:`~worldpm_reward.samples.ScoreResult` lists come back (both pickled).
The child builds the scorer from a picklable factory, e.g.
``functools.partial(RewardModel.from_pretrained, path, model_config)``.

The child can never hang the server:
  * it beats a heartbeat (a shared timestamp, every ``heartbeat_s``); a child that stops
    beating for ``heartbeat_timeout_s`` (SIGSTOPped, frozen) is killed, idle or busy;
  * every call has a deadline derived from its size (``call_timeout_s`` plus
    ``call_timeout_per_ktoken_s`` per 1,000 estimated tokens): a call that does not come
    back in time (a hung GPU kernel, a deadlock) gets its child killed;
  * a killed or dead child's in-flight batch fails with :class:`ScorerProcessError` (a
    :class:`~worldpm_reward.errors.ScorerUnavailableError`: 503 + Retry-After with the
    reason), and a new child is started in the background; until it is ready, calls fail
    at once with the same error, and a restart that keeps failing says why (``reason``);
  * ``alive`` is true only while a child is ready and beating (``/health`` reports it);
  * :meth:`ProcessScorer.close` returns within its timeout whatever the child does.
A scorer whose ``alive`` turns False (the vLLM engine whose server died) makes its child
exit after answering, and a new child is started at once. The child also checks it with
each heartbeat, so an engine that dies between calls takes ``alive`` down within a beat
and is replaced before the next request instead of failing it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

from worldpm_reward.errors import ScorerUnavailableError
from worldpm_reward.rewards import renumbered
from worldpm_reward.samples import Scorer, ScoreResult, estimate_tokens, finite_or_error

logger = logging.getLogger(__name__)


class ScorerProcessError(ScorerUnavailableError):
    """The scorer process could not be started, hung, or died while scoring."""


class _Stuck(Exception):
    """The child did not answer in time, stopped beating, or exited."""


def _child(factory: Callable[[], Scorer], conn: Any, beat: Any, lost: Any, beat_s: float) -> None:
    built: list[Scorer] = []

    def pulse() -> None:
        while True:
            beat.value = time.monotonic()
            if built and not lost.value and not _engine_alive(built[0]):
                lost.value = 1  # e.g. its vLLM died while idle: the parent restarts this child
            time.sleep(beat_s)

    threading.Thread(target=pulse, name="worldpm-heartbeat", daemon=True).start()
    try:
        scorer = factory()
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    built.append(scorer)
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
            if _engine_alive(scorer):
                conn.send(("ok", results))
            else:  # e.g. its vLLM died: answer, then exit so that the parent starts a fresh one
                conn.send(("ok, restart me", results))
                return
    finally:
        close = getattr(scorer, "close", None)
        if close is not None:  # e.g. stop a launched vLLM
            close()


def _engine_alive(scorer: Scorer) -> bool:
    """The scorer's own ``alive`` (False once a launched vLLM has exited); True if it has none."""
    try:
        return bool(getattr(scorer, "alive", True))
    except Exception:  # a check that fails says nothing about the engine
        logger.exception("the scorer's alive check failed")
        return True


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:limit]


class ProcessScorer:
    """A scorer (``score_detailed``) that runs ``factory()``'s scorer in a child process.

    Args:
        factory: a picklable zero-argument callable that builds the scorer (it runs in the child).
        name: the child process's name.
        call_timeout_s: the deadline of a call, before its size is added, in seconds.
        call_timeout_per_ktoken_s: seconds added to a call's deadline per 1,000 estimated tokens.
        heartbeat_s: how often the child beats.
        heartbeat_timeout_s: a child silent for this long is taken as hung and killed.
        load_timeout_s: most seconds a (re)start may take to load the model (None: no bound;
            a frozen child is still caught by the heartbeat).
    """

    def __init__(
        self,
        factory: Callable[[], Scorer],
        *,
        name: str = "worldpm-scorer",
        call_timeout_s: float = 120.0,
        call_timeout_per_ktoken_s: float = 2.0,
        heartbeat_s: float = 0.5,
        heartbeat_timeout_s: float = 15.0,
        load_timeout_s: float | None = None,
    ) -> None:
        self.factory = factory
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.call_timeout_per_ktoken_s = call_timeout_per_ktoken_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = max(heartbeat_timeout_s, 4 * heartbeat_s)
        self.load_timeout_s = load_timeout_s
        self._lock = threading.Lock()  # one call on the pipe at a time; installs a new child
        self._proc: Any = None
        self._conn: Any = None
        self._beat: Any = None
        self._lost: Any = None
        self._closed = threading.Event()
        self._restarting: threading.Thread | None = None
        self.reason: str | None = None  # why no child is ready (None: one is)
        self.restarts = 0
        self.kills = 0
        self._install(*self._spawn())
        self._watchdog = threading.Thread(target=self._watch, name="worldpm-scorer-watchdog", daemon=True)
        self._watchdog.start()

    # -- starting a child ----------------------------------------------------------------
    def _spawn(self) -> tuple[Any, Any, Any, Any]:
        """Start a child and wait until its scorer is loaded; raises ScorerProcessError."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        beat = ctx.RawValue("d", 0.0)  # 0: not started yet (importing takes a while)
        lost = ctx.RawValue("b", 0)  # 1: the child's scorer lost its engine (set by the child)
        proc = ctx.Process(
            target=_child,
            args=(self.factory, child, beat, lost, self.heartbeat_s),
            name=self.name,
            daemon=True,
        )
        proc.start()
        child.close()
        deadline = None if self.load_timeout_s is None else time.monotonic() + self.load_timeout_s
        try:
            kind, payload = self._reply(parent, proc, beat, deadline, "loading")
        except _Stuck as exc:
            self._kill(proc)
            parent.close()
            raise ScorerProcessError(f"the scorer process failed while loading: {exc}") from None
        if kind != "ready":
            proc.join(5)
            self._kill(proc)
            parent.close()
            raise ScorerProcessError(f"loading the scorer failed in its process: {payload}")
        logger.info("scorer %s running in process %d", payload, proc.pid)
        return proc, parent, beat, lost

    def _install(self, proc: Any, conn: Any, beat: Any, lost: Any) -> None:
        with self._lock:
            self._proc, self._conn, self._beat, self._lost = proc, conn, beat, lost
            self.reason = None

    def _reply(self, conn: Any, proc: Any, beat: Any, deadline: float | None, doing: str) -> Any:
        """The child's next message, or _Stuck when it exits, stops beating, passes
        ``deadline`` or the scorer is closed first."""
        while True:
            now = time.monotonic()
            wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - now))
            try:
                if conn.poll(wait):
                    return conn.recv()
            except (EOFError, OSError):
                proc.join(1)
                raise _Stuck(f"it exited while {doing} (exit code {proc.exitcode})") from None
            now = time.monotonic()
            if not proc.is_alive():
                raise _Stuck(f"it exited while {doing} (exit code {proc.exitcode})")
            silent = now - beat.value
            if beat.value and silent > self.heartbeat_timeout_s:
                raise _Stuck(
                    f"it stopped answering while {doing} (no heartbeat for {silent:.0f} s; "
                    f"heartbeat_timeout_s={self.heartbeat_timeout_s:g})"
                )
            if deadline is not None and now >= deadline:
                raise _Stuck(f"it did not finish {doing} within its deadline")
            if self._closed.is_set():
                raise _Stuck(f"the server is shutting down while {doing}")

    @staticmethod
    def _kill(proc: Any) -> None:
        if proc.is_alive():
            proc.kill()  # SIGKILL: works on a stopped or deadlocked process too
        proc.join(5)

    def _lose_child(self, why: str, wait_exit_s: float = 0.0) -> None:
        """The current child is gone or useless: kill it and restart in the background.
        Call with the lock held."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        self.reason = f"the scorer process is restarting: {why}"
        if wait_exit_s > 0:
            proc.join(wait_exit_s)
        if proc.is_alive():
            self.kills += 1
        self._kill(proc)
        with contextlib.suppress(OSError):
            self._conn.close()
        logger.error("scorer process %s: %s; restarting it", proc.pid, why)
        if not self._closed.is_set() and (self._restarting is None or not self._restarting.is_alive()):
            self._restarting = threading.Thread(
                target=self._restart_loop, name="worldpm-scorer-restart", daemon=True
            )
            self._restarting.start()

    def _retire_engineless_child(self) -> None:
        """The idle child's scorer lost its engine: ask it to stop, so that its scorer closes the
        engine (a launched vLLM's process group), then restart. Call with the lock held."""
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._lose_child("its engine died", wait_exit_s=60.0)

    def _restart_loop(self) -> None:
        delay = 1.0
        while not self._closed.is_set():
            self.restarts += 1
            logger.warning("starting a new scorer process (restart %d)", self.restarts)
            try:
                proc, conn, beat, lost = self._spawn()
            except ScorerProcessError as exc:
                self.reason = f"restarting the scorer process failed (retrying in {delay:.0f} s): " + (
                    _first_line(str(exc))
                )
                logger.error("%s", exc)
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, 60.0)
                continue
            if self._closed.is_set():
                self._kill(proc)
                return
            self._install(proc, conn, beat, lost)
            return

    def _watch(self) -> None:
        """Catch a child that dies or freezes while idle (a busy one is caught by its call)."""
        while not self._closed.wait(max(0.1, self.heartbeat_s)):
            if self._proc is None or not self._lock.acquire(blocking=False):
                continue
            try:
                proc = self._proc
                if proc is None:
                    continue
                if not proc.is_alive():
                    self._lose_child(f"it exited (exit code {proc.exitcode})")
                elif self._lost.value:
                    self._retire_engineless_child()
                elif time.monotonic() - self._beat.value > self.heartbeat_timeout_s:
                    self._lose_child(
                        f"it stopped answering (no heartbeat for {self.heartbeat_timeout_s:g} s)"
                    )
            finally:
                self._lock.release()

    # -- the scorer seam -----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """A child is ready and beating, and its scorer has its engine (what ``/health`` reports)."""
        proc, beat, lost = self._proc, self._beat, self._lost
        return (
            proc is not None
            and proc.is_alive()
            and not lost.value
            and time.monotonic() - beat.value <= self.heartbeat_timeout_s
            and not self._closed.is_set()
        )

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def deadline_s(self, samples: Sequence[Any]) -> float:
        """The most seconds a call on ``samples`` may take before its child is killed."""
        tokens = sum(estimate_tokens(s) for s in samples)
        return self.call_timeout_s + self.call_timeout_per_ktoken_s * tokens / 1000

    @contextlib.contextmanager
    def _bounded(self, proc: Any, beat: Any, deadline: float) -> Iterator[list[str]]:
        """Kill ``proc`` if the block outlives ``deadline`` (plus a beat) or the child stops
        beating. A pipe write to a child that stopped reading (SIGSTOPped with the pipe full)
        or a read of a reply cut short would block for good otherwise, and the watchdog
        cannot step in while the call holds the lock; killing the child breaks the pipe.
        Yields the list that holds why it fired."""
        done = threading.Event()
        fired: list[str] = []

        def guard() -> None:
            while not done.wait(self.heartbeat_s):
                now = time.monotonic()
                if beat.value and now - beat.value > self.heartbeat_timeout_s:
                    fired.append(
                        f"it stopped answering while scoring (no heartbeat for {now - beat.value:.0f} s; "
                        f"heartbeat_timeout_s={self.heartbeat_timeout_s:g})"
                    )
                elif now >= deadline + self.heartbeat_s:
                    fired.append("it did not finish scoring within its deadline")
                else:
                    continue
                if proc.is_alive():
                    self.kills += 1
                self._kill(proc)
                return

        thread = threading.Thread(target=guard, name="worldpm-scorer-call-guard", daemon=True)
        thread.start()
        try:
            yield fired
        finally:
            done.set()
            thread.join()

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        samples = list(samples)
        try:
            data = bytes(ForkingPickler.dumps(samples))
        except Exception:  # e.g. a sample nested past the recursion limit: only it fails
            return self._score_picklable(samples)
        deadline = time.monotonic() + self.deadline_s(samples)
        with self._lock:
            if self._closed.is_set():
                raise ScorerProcessError("the scorer process is shut down")
            if self._proc is None:
                raise ScorerProcessError(self.reason or "the scorer process is restarting")
            if self._lost.value:  # known before the watchdog's tick: restart now, spend no call
                self._retire_engineless_child()
                raise ScorerProcessError(self.reason or "the scorer process is restarting")
            try:
                with self._bounded(self._proc, self._beat, deadline) as fired:
                    try:
                        self._conn.send_bytes(data)
                        kind, payload = self._reply(self._conn, self._proc, self._beat, deadline, "scoring")
                    except (_Stuck, OSError, EOFError) as exc:
                        raise _Stuck(fired[0] if fired else str(exc)) from None
            except _Stuck as exc:
                why = str(exc)
                self._lose_child(why)
                raise ScorerProcessError(
                    f"the scorer process failed while scoring this batch of {len(samples)} samples ({why}); "
                    "it is being restarted, retry shortly"
                ) from None
            if kind == "ok, restart me":
                logger.warning("the scorer lost its engine; restarting the scorer process")
                self._lose_child("its engine died", wait_exit_s=60.0)
        if kind not in ("ok", "ok, restart me"):
            raise ScorerProcessError(f"scoring failed in the scorer process: {payload}")
        return finite_or_error(payload, None)

    def _score_picklable(self, samples: list[Any]) -> list[ScoreResult]:
        """Score the samples that can be sent to the child; each one that cannot (pickling
        fails: nested past the recursion limit) gets its own error, numbered as the caller's."""
        results: list[ScoreResult | None] = [None] * len(samples)
        sendable: list[int] = []
        for i, sample in enumerate(samples):
            try:
                ForkingPickler.dumps(sample)
                sendable.append(i)
            except Exception as exc:
                results[i] = ScoreResult(
                    score=None,
                    error=f"sample {i}: cannot be passed to the scorer process ({type(exc).__name__}: "
                    f"{_first_line(str(exc))}); is it nested too deeply?",
                )
        if sendable:
            got = self.score_detailed([samples[i] for i in sendable])
            for i, r in zip(sendable, got):
                if r.error is not None:
                    r.error = renumbered(r.error, i)
                results[i] = r
        return [r for r in results if r is not None]

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the child after the call in progress, if any; returns within about
        ``timeout_s`` whatever the child does (it is killed then)."""
        self._closed.set()
        end = time.monotonic() + timeout_s
        got = self._lock.acquire(timeout=max(0.0, timeout_s))
        try:
            proc = self._proc
            if proc is None:
                return
            if got:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
                proc.join(max(0.0, end - time.monotonic()))
            self._kill(proc)
            if got:
                with contextlib.suppress(OSError):
                    self._conn.close()
                self._proc = None
            self.reason = "the scorer process is shut down"
        finally:
            if got:
                self._lock.release()


__all__ = ["ProcessScorer", "ScorerProcessError"]
