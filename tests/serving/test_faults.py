"""Fault injection outside the request (issue 20): a hung or dying scorer, a non-finite score,
a bad or locked state file, a lying replica. Every call returns within its stated bound,
every failed sample carries an error, no bare 500, no lost or mixed rewards.

Scorers here are the small fakes of ``wpr_fakes`` (a spawned scorer process imports them
without torch), so the suite is fast; the end-to-end checks against ``worldpm-reward serve``
are marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from wpr_fakes import (
    FaultyScorer,
    FnScorer,
    conv,
    expected_score,
    make_faulty,
    make_mortal,
    make_unless_marker,
)
from wpr_servers import server_thread

from worldpm_reward.errors import RemoteScoringError, StateFileError
from worldpm_reward.samples import ScoreResult
from worldpm_reward.serving import ServerConfig, create_app
from worldpm_reward.serving.client import RemoteScorer
from worldpm_reward.serving.idempotency import RecentRequests
from worldpm_reward.serving.limits import uvicorn_options
from worldpm_reward.serving.protocol import DEFAULT_FALLBACK_REWARD
from worldpm_reward.serving.scorer_process import ProcessScorer, ScorerProcessError
from worldpm_reward.shaping import RewardShaper, RunningStats, ShapingConfig, read_stats


def _wait(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def _process_scorer(**kw: Any) -> ProcessScorer:
    opts = {"heartbeat_s": 0.1, "heartbeat_timeout_s": 1.0, "call_timeout_s": 30.0}
    opts.update(kw)
    factory = opts.pop("factory", functools.partial(make_faulty, 0.5))
    return ProcessScorer(factory, **opts)


# -- 1. a hung scorer child ----------------------------------------------------------------
@pytest.mark.slow
def test_1_a_stopped_scorer_child_is_detected_killed_and_replaced() -> None:
    """SIGSTOP the child mid-call: the call fails within the heartbeat timeout (not forever),
    ``alive`` (what /health reports) turns False, the child is killed and a new one serves."""
    scorer = _process_scorer()
    try:
        assert [r.score for r in scorer.score_detailed([conv("abc")])] == [expected_score("abc")]
        guarded = scorer.score_detailed([conv("INF")])[0]  # results from the child are guarded too
        assert guarded.score is None and "non-finite" in (guarded.error or "")
        first = scorer.pid
        assert first is not None

        def stop_soon() -> None:
            time.sleep(0.2)
            os.kill(first, signal.SIGSTOP)

        threading.Thread(target=stop_soon).start()
        start = time.monotonic()
        with pytest.raises(ScorerProcessError, match=r"stopped answering|exited"):
            scorer.score_detailed([conv("SLOW")])
        assert time.monotonic() - start < 5.0
        assert not scorer.alive
        assert _wait(lambda: scorer.alive, 60), scorer.reason
        assert scorer.pid != first and scorer.kills >= 1
        assert scorer.score_detailed([conv("abcd")])[0].score == expected_score("abcd")
        # stopped while idle: the watchdog notices, without any call
        second = scorer.pid
        assert second is not None
        os.kill(second, signal.SIGSTOP)
        assert _wait(lambda: not scorer.alive, 5)
        assert _wait(lambda: scorer.alive and scorer.pid != second, 60), scorer.reason
    finally:
        scorer.close(timeout_s=5)


@pytest.mark.slow
def test_1_a_stopped_child_that_cannot_take_a_large_batch_fails_the_call_within_a_bound() -> None:
    """A child SIGSTOPped while idle, then a batch larger than the pipe's buffer: the write
    blocked for good under the call's lock (the watchdog could not step in), hanging this
    request and every later one. The call now fails within the heartbeat timeout."""
    scorer = _process_scorer(heartbeat_timeout_s=1.0)
    try:
        first = scorer.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        big = [conv("x" * 4_000_000)]  # far past a socketpair's buffer (a few hundred KB)
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(scorer.score_detailed(big))
            except Exception as exc:
                outcome.append(exc)

        start = time.monotonic()
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), "the call is still blocked writing to the stopped child"
        assert time.monotonic() - start < 10.0
        (err,) = outcome
        assert isinstance(err, ScorerProcessError) and "stopped answering" in str(err), err
        assert _wait(lambda: scorer.alive and scorer.pid != first, 60), scorer.reason
        assert scorer.score_detailed([conv("abcd")])[0].score == expected_score("abcd")
    finally:
        scorer.close(timeout_s=5)


@pytest.mark.slow
def test_1_a_sample_that_cannot_be_pickled_fails_alone() -> None:
    """A sample nested past the recursion limit (valid JSON: tool-call arguments 500 deep)
    could not be pickled to the child, and the whole batch failed (a 500 for every request
    sharing it). Now only that sample gets an error, numbered as the caller's."""
    scorer = _process_scorer()
    try:
        deep: Any = "leaf"
        for _ in range(2000):
            deep = {"k": deep}
        bad = {"messages": conv("abc"), "extra": deep}
        got = scorer.score_detailed([conv("abc"), bad, conv("abcdef")])
        assert [r.score for r in got] == [expected_score("abc"), None, expected_score("abcdef")]
        assert got[1].error and got[1].error.startswith("sample 1: cannot be passed to the scorer process")
        assert scorer.kills == 0 and scorer.alive
    finally:
        scorer.close(timeout_s=5)


@pytest.mark.slow
def test_1_an_engine_that_dies_between_calls_is_replaced_before_the_next_call(tmp_path: Path) -> None:
    """A launched vLLM killed while the server is idle: ``alive`` (/health) turns False within
    a few beats, without a call; the child is stopped cleanly (its scorer closes the engine),
    a new one is started, and the next call is scored rather than failed."""
    marker = str(tmp_path / "engine-died")
    scorer = _process_scorer(factory=functools.partial(make_mortal, marker))
    try:
        assert scorer.score_detailed([conv("abc")])[0].score == expected_score("abc")
        first = scorer.pid
        assert first is not None and scorer.alive
        Path(f"{marker}.{first}").touch()  # its engine dies; no call is in flight
        assert _wait(lambda: not scorer.alive, 5)
        with pytest.raises(ScorerProcessError, match="engine died"):  # 503 + reason, not a spent call
            scorer.score_detailed([conv("abc")])
        assert _wait(lambda: scorer.alive and scorer.pid != first, 60), scorer.reason
        assert Path(f"{marker}.closed.{first}").exists()  # stopped through its scorer's close()
        assert scorer.kills == 0 and scorer.restarts == 1
        assert scorer.score_detailed([conv("abcd")])[0].score == expected_score("abcd")
    finally:
        scorer.close(timeout_s=5)


@pytest.mark.slow
def test_1_a_call_past_its_deadline_kills_the_child() -> None:
    """A call that never returns (a hung kernel: the heartbeat still beats) ends at its
    deadline, derived from its size."""
    scorer = _process_scorer(call_timeout_s=1.0, call_timeout_per_ktoken_s=0.0, heartbeat_timeout_s=30.0)
    try:
        assert scorer.deadline_s([conv("x")]) == pytest.approx(1.0)
        start = time.monotonic()
        with pytest.raises(ScorerProcessError, match="deadline"):
            scorer.score_detailed([conv("HANG")])
        assert time.monotonic() - start < 4.0
        assert _wait(lambda: scorer.alive, 60), scorer.reason
        assert scorer.score_detailed([conv("ok")])[0].score == expected_score("ok")
    finally:
        scorer.close(timeout_s=5)
    scorer.call_timeout_per_ktoken_s = 2.0
    assert scorer.deadline_s([conv("x" * 3000)] * 10) > scorer.deadline_s([conv("x")]) + 10  # size counts


@pytest.mark.slow
def test_1_server_answers_503_with_reason_and_health_follows_the_child(tmp_path: Path) -> None:
    """Over HTTP: while the child is stopped, requests get 503 + Retry-After naming the
    reason within the heartbeat bound, /health says 503 (not 200), then recovers."""
    scorer = _process_scorer()
    cfg = ServerConfig(retry_after_s=2)
    app = create_app(scorer, cfg)
    with server_thread(app, **uvicorn_options(cfg)) as url:
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        pid = scorer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("abc")]}, timeout=30)
        assert time.monotonic() - start < 10.0  # the heartbeat bound (1 s), with room for a loaded machine
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert "scorer process" in r.json()["detail"]
        health = httpx.get(f"{url}/health", timeout=5)
        if health.status_code == 503:  # unless the new child is already up
            assert health.json()["ready"] is False
        assert _wait(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 60)
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("abc")]}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["score"] == expected_score("abc")
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        unavailable = re.search(r"^worldpm_reward_scorer_unavailable_total (\S+)$", metrics, re.M)
        assert unavailable and float(unavailable.group(1)) >= 1


@pytest.mark.slow
def test_1_shutdown_finishes_within_the_drain_timeout_whatever_the_child_does() -> None:
    """A stopped child with generous timeouts and a request in flight: shutdown still ends
    within drain_timeout_s (the child is killed), and the caller gets an answer, not a hang."""
    scorer = _process_scorer(heartbeat_timeout_s=120.0, call_timeout_s=120.0)
    pid = scorer.pid
    assert pid is not None
    cfg = ServerConfig(drain_timeout_s=2.0)
    app = create_app(scorer, cfg)
    answers: list[Any] = []
    with server_thread(app, **uvicorn_options(cfg)) as url:
        os.kill(pid, signal.SIGSTOP)

        def call() -> None:
            try:
                answers.append(httpx.post(f"{url}/v1/score", json={"samples": [conv("x")]}, timeout=60))
            except httpx.HTTPError as exc:
                answers.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        start = time.monotonic()
        # server_thread's exit sets should_exit and joins (the SIGTERM path)
    took = time.monotonic() - start
    caller.join(10)
    assert took < 2.0 + 4.0, took
    assert answers and not caller.is_alive()
    assert not scorer.alive
    assert _wait(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
    except OSError:
        return True


# -- 10. a scorer killed mid-batch; a restart that cannot succeed ------------------------
@pytest.mark.slow
def test_10_killed_mid_batch_is_503_with_reason_and_a_failing_restart_answers_fast(tmp_path: Path) -> None:
    marker = tmp_path / "gpu-gone"
    scorer = _process_scorer(factory=functools.partial(make_unless_marker, str(marker), 3.0))
    cfg = ServerConfig(token="t0k")
    app = create_app(scorer, cfg)
    auth = {"Authorization": "Bearer t0k"}
    with server_thread(app, **uvicorn_options(cfg)) as url:
        pid = scorer.pid
        assert pid is not None
        marker.touch()  # from now on a restart fails

        def kill_soon() -> None:
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill_soon).start()
        r = httpx.post(
            f"{url}/v1/score", json={"samples": [conv("SLOW"), conv("b")]}, headers=auth, timeout=30
        )
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "exited" in r.json()["detail"]
        assert _wait(lambda: "failed" in (scorer.reason or ""), 60), scorer.reason
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("abc")]}, headers=auth, timeout=30)
        assert time.monotonic() - start < 1.0  # no inline re-load
        assert r.status_code == 503 and "restarting the scorer process failed" in r.json()["detail"]
        assert "GPU is gone" in r.json()["detail"]
        authed = httpx.get(f"{url}/health", headers=auth, timeout=5)
        assert authed.status_code == 503 and "GPU is gone" in authed.json()["error"]
        assert "Traceback" not in authed.text
        anonymous = httpx.get(f"{url}/health", timeout=5)
        assert anonymous.status_code == 503 and "GPU is gone" not in anonymous.text  # no details leaked
        marker.unlink()  # the GPU is back: the next restart attempt succeeds
        assert _wait(lambda: scorer.alive, 60), scorer.reason
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("abc")]}, headers=auth, timeout=30)
        assert r.status_code == 200


def test_10_no_bare_500_from_an_unexpected_failure() -> None:
    class Broken:
        def score_detailed(self, samples: Any) -> list[ScoreResult]:
            raise KeyError("boom")

    app = create_app(Broken())
    with server_thread(app) as url:
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("a")]}, timeout=30)
    assert r.status_code == 500 and "KeyError" in r.json()["detail"]


# -- 3. a non-finite score -------------------------------------------------------------------
def test_3_a_non_finite_score_is_that_samples_error_and_never_poisons_normalization(tmp_path: Path) -> None:
    state = tmp_path / "stats.json"
    shaping = ShapingConfig(normalize="running", state_file=str(state), state_sync_s=0)
    app = create_app(FaultyScorer(), ServerConfig(), shaping)
    replies = ["a", "bbb", "INF", "cccccc", "NAN"]
    with server_thread(app) as url:
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv(x) for x in replies]}, timeout=30)
        assert r.status_code == 200
        rows = r.json()["results"]
        for reply, row in zip(replies, rows):
            if reply in ("INF", "NAN"):
                assert row["score"] is None and row["reward"] is None and "non-finite" in row["error"]
            else:
                assert row["error"] is None and math.isfinite(row["reward"])
        again = httpx.post(f"{url}/v1/score", json={"samples": [conv("dd"), conv("e")]}, timeout=30).json()
        assert all(math.isfinite(x["reward"]) for x in again["results"])
        # OpenRLHF: never [null]; the bad item gets the fallback reward (the default since
        # issue 21) and an error naming it, and shows in the failure log
        q = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nINF<|im_end|>"
        bad = httpx.post(f"{url}/get_reward", json={"query": [q]}, timeout=30)
        assert bad.status_code == 200, bad.text
        body = bad.json()
        assert body["rewards"] == [DEFAULT_FALLBACK_REWARD] and body["extra_logs"]["worldpm_failed"] == [1.0]
        assert "non-finite" in json.dumps(body["errors"])
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert "worldpm_reward_nonfinite_scores_total 3.0" in metrics
    saved = json.loads(state.read_text())
    assert saved["count"] == 5 and math.isfinite(saved["mean"]) and math.isfinite(saved["m2"])
    want = RunningStats.of([expected_score(x) for x in ("a", "bbb", "cccccc", "dd", "e")])
    assert saved["mean"] == pytest.approx(want.mean)


def test_3_every_python_surface_guards_non_finite_scores(reward_model: Any) -> None:
    """The source (RewardModel.score_detailed), the shaper and the statistics."""
    original = reward_model.engine.score_encoded

    def overflow(ready: Any, results: Any, *args: Any, **kw: Any) -> Any:
        out = original(ready, results, *args, **kw)
        results[1].score = math.inf
        return out

    reward_model.engine.score_encoded = overflow
    try:
        got = reward_model.score_detailed([conv("one"), conv("two"), conv("three")], start_index=10)
    finally:
        del reward_model.engine.score_encoded
    assert got[1].score is None and got[1].error.startswith("sample 11: ") and "non-finite" in got[1].error
    assert got[0].ok and got[2].ok
    shaper = RewardShaper(ShapingConfig(normalize="running"))
    shaped = shaper([1.0, math.inf, 3.0, math.nan])
    assert shaper.stats.count == 2 and math.isfinite(shaper.stats.mean)
    assert shaped.rewards[1] is None and shaped.rewards[3] is None
    with pytest.raises(ValueError, match="finite"):
        RunningStats().update([math.nan])


# -- 4. bad state files ----------------------------------------------------------------------
BAD_STATES = {
    "NaN mean": ('{"count": 3, "mean": NaN, "m2": 1.0}', "mean"),
    "infinite m2": ('{"count": 3, "mean": 0.5, "m2": Infinity}', "m2"),
    "negative count": ('{"count": -2, "mean": 0.5, "m2": 1.0}', "count"),
    "negative m2": ('{"count": 3, "mean": 0.5, "m2": -1.0}', "m2"),
    "huge count": ('{"count": 1e300, "mean": 0.5, "m2": 1.0}', "count"),
    "count as text": ('{"count": "7", "mean": 0.5, "m2": 1.0}', "count"),
    "empty but m2": ('{"count": 0, "mean": 0.0, "m2": 100}', "count"),
    "missing field": ('{"count": 3, "mean": 0.5}', "m2"),
    "garbage": ("{not json", "not JSON"),
    "a list": ("[1, 2, 3]", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_4_a_bad_state_file_is_refused_naming_the_file_and_field(case: str, tmp_path: Path) -> None:
    text, field = BAD_STATES[case]
    state = tmp_path / "stats.json"
    state.write_text(text)
    with pytest.raises(StateFileError) as info:
        RewardShaper(ShapingConfig(normalize="running", state_file=str(state)))
    message = str(info.value)
    assert str(state) in message and field in message and "\n" not in message
    # with the explicit reset: set aside with a warning, the statistics start over
    shaper = RewardShaper(
        ShapingConfig(normalize="running", state_file=str(state), state_reset=True, state_sync_s=0)
    )
    assert shaper.stats == RunningStats()
    assert list(tmp_path.glob("stats.json.bad-*"))
    shaper([1.0, 2.0])
    assert read_stats(state).count == 2


def test_4_serve_on_a_bad_state_file_is_one_error_line(tmp_path: Path, capsys: Any) -> None:
    from worldpm_reward.cli import main

    state = tmp_path / "stats.json"
    state.write_text('{"count": 3, "mean": NaN, "m2": 1.0}')
    code = main(
        ["serve", "--model", str(tmp_path), "--normalize", "running", "--normalize-state", str(state)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "'mean'" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_4_6_the_file_records_its_model_and_refuses_another(tmp_path: Path) -> None:
    state = str(tmp_path / "stats.json")
    a = RewardShaper(
        ShapingConfig(normalize="running", state_file=state, state_sync_s=0, state_model="worldpm:A")
    )
    a([1.0, 2.0, 3.0])
    assert json.loads(Path(state).read_text())["model"] == "worldpm:A"
    with pytest.raises(StateFileError, match="'model'"):
        RewardShaper(ShapingConfig(normalize="running", state_file=state, state_model="worldpm:B"))
    # a running server whose file is taken over by another model: not merged, counted, no raise
    Path(state).write_text(json.dumps({"count": 9, "mean": 5.0, "m2": 1.0, "model": "worldpm:B"}))
    a([4.0])
    assert a.sync_failures == 1 and json.loads(Path(state).read_text())["count"] == 9


# -- 5 / 6. state-file I/O off the event loop; persistence failures ------------------------
def test_5_a_held_state_lock_never_blocks_the_server(tmp_path: Path) -> None:
    """Another process holds the lock (a stopped replica, an NFS stall): scoring and
    /health/live stay fast, the failed merge is counted, and once the lock is free the file
    gets every sample exactly once."""
    state = tmp_path / "stats.json"
    shaping = ShapingConfig(
        normalize="running", state_file=str(state), state_sync_s=0, state_lock_timeout_s=5.0
    )
    app = create_app(FaultyScorer(), ServerConfig(), shaping)
    shaper = app.state.service.reward.shaper
    with server_thread(app) as url:
        holder = open(f"{state}.lock", "a")  # noqa: SIM115
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            for i in range(3):
                start = time.monotonic()
                r = httpx.post(f"{url}/v1/score", json={"samples": [conv("x" * (i + 1))]}, timeout=30)
                assert r.status_code == 200 and time.monotonic() - start < 2.5  # not the 5 s lock wait
                start = time.monotonic()
                assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200
                assert time.monotonic() - start < 2.5
            assert _wait(lambda: shaper.sync_failures >= 1, 20)
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            assert "worldpm_reward_state_file_failures" in metrics
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            holder.close()
        r = httpx.post(f"{url}/v1/score", json={"samples": [conv("yyyy")]}, timeout=30)
        assert r.status_code == 200
    assert read_stats(state).count == 4  # none lost, none counted twice


def test_6_deleted_garbage_or_unwritable_state_file(tmp_path: Path) -> None:
    state = tmp_path / "stats.json"
    shaper = RewardShaper(ShapingConfig(normalize="running", state_file=str(state), state_sync_s=0))
    shaper([1.0, 2.0, 3.0, 4.0])
    assert read_stats(state).count == 4
    state.unlink()  # deleted while running: rewritten from the full statistics
    shaper([5.0])
    assert read_stats(state).count == 5
    state.write_text("garbage")  # a failed merge: logged and counted, scoring goes on
    shaped = shaper([6.0])
    assert shaped.rewards[0] is not None and shaper.sync_failures == 1
    state.write_text(json.dumps({"count": 5, "mean": 3.0, "m2": 10.0}))  # repaired
    shaper([7.0])
    assert read_stats(state).count == 7  # the batch of the failed merge is counted once, not lost
    blocker = Path(f"{state}.tmp{os.getpid()}")
    blocker.mkdir()  # the file cannot be written (as with a read-only directory, even as root)
    shaper([8.0])
    assert shaper.sync_failures == 2 and "cannot be written" in (shaper.last_sync_error or "")
    blocker.rmdir()
    shaper([9.0])
    assert read_stats(state).count == 9


# -- 2. the client's worst case with a hung replica ----------------------------------------
class _Gate:
    """A scorer that hangs (while /health says 200) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def score_detailed(self, samples: Any) -> list[ScoreResult]:
        self.release.wait(120)
        return FaultyScorer().score_detailed(samples)


@pytest.mark.slow
def test_2_a_replica_that_hangs_behind_a_healthy_health_check_costs_at_most_a_hedge() -> None:
    """One of two replicas never answers but its /health says 200 (the issue's stuck scorer):
    200 consecutive calls each return well within 1 s with the right scores, the client's
    threads and connections do not grow, and the health probe alone does not bring the
    replica back."""
    gate = _Gate()
    stuck_app, good_app = create_app(gate), create_app(FaultyScorer())
    with server_thread(stuck_app) as stuck, server_thread(good_app) as good:
        client = RemoteScorer(
            [stuck, good],
            timeout_s=30,
            hedge=0.2,
            health_interval_s=0.2,
            health_timeout_s=2.0,  # one slow /health of the good replica must not take it out
            cooldown_s=0.5,
        )
        try:
            client.score_detailed([conv("warm")])
            threads_before = threading.active_count()
            walls = []
            for i in range(200):
                reply = "r" * (1 + i % 7)
                start = time.monotonic()
                got = client.score_detailed([conv(reply)])
                walls.append(time.monotonic() - start)
                assert got[0].score == expected_score(reply)
            assert max(walls) < 1.0, sorted(walls)[-5:]
            assert threading.active_count() <= threads_before + 1
            assert stuck in client._suspect  # /health 200 did not bring it back
            pool = client._aclient._transport._pool
            assert len(pool.connections) <= 4
        finally:
            gate.release.set()
            client.close()


# -- 8. a lying replica ---------------------------------------------------------------------
class _App:
    """A raw ASGI app with the ``state`` that server_thread sets."""

    def __init__(self, fn: Any) -> None:
        import types

        self.fn, self.state = fn, types.SimpleNamespace()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.fn(scope, receive, send)


def _lying_app(kind: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                await send({"type": event + ".complete"})
                if event == "lifespan.shutdown":
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(b"content-type", b"application/json")]
        n = 0
        try:
            payload = json.loads(body or b"{}")
            n = len(payload.get("samples") or payload.get("query") or [])
        except ValueError:
            pass
        if scope["path"] == "/health":
            out = b'{"status": "ok"}'
        elif kind == "html":
            out, headers = b"<html>proxy error</html>", [(b"content-type", b"text/html")]
        elif kind == "null":
            out = b"null"
        elif kind == "short":
            out = json.dumps(
                {"results": [{"score": 1.0}] * max(0, n - 1), "rewards": [1.0] * max(0, n - 1)}
            ).encode()
        elif kind == "nan-string":
            out = json.dumps(
                {"results": [{"score": "NaN", "error": None}] * n, "rewards": ["NaN"] * n}
            ).encode()
        elif kind == "null-no-error":
            out = json.dumps(
                {"results": [{"score": None, "error": None}] * n, "rewards": [None] * n}
            ).encode()
        else:  # bogus Content-Encoding
            out = b"not gzip at all"
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return _App(app)


@pytest.mark.parametrize("kind", ["html", "null", "short", "nan-string", "null-no-error", "bad-encoding"])
def test_8_a_fast_wrong_answer_is_that_replicas_failure_and_retried_elsewhere(kind: str) -> None:
    good_app = create_app(FaultyScorer())
    with server_thread(_lying_app(kind)) as liar, server_thread(good_app) as good:
        client = RemoteScorer([liar, good], backoff_s=0.01, retries=3, hedge=None, health_interval_s=0)
        try:
            for i in range(4):  # whichever replica the round-robin starts with
                replies = ["a" * (i + 1), "bb"]
                got = client.score_detailed([conv(r) for r in replies])
                assert [r.score for r in got] == [expected_score(r) for r in replies]
            assert good not in client._down_until or client._down_until[good] <= time.monotonic()
            assert liar in client._suspect
            q = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nabc<|im_end|>"
            body = client.get_reward([q, q, q, q])
            assert len(body["rewards"]) == 4 and all(isinstance(x, float) for x in body["rewards"])
        finally:
            client.close()
        alone = RemoteScorer([liar], backoff_s=0.01, retries=1)
        try:
            with pytest.raises(RemoteScoringError):  # only library exceptions escape
                alone.score_detailed([conv("a")])
            with pytest.raises(RemoteScoringError):
                alone.get_reward(["x"] * 4)
            with pytest.raises(RemoteScoringError):
                asyncio.run(alone.ascore_detailed([conv("a")]))
        finally:
            alone.close()


# -- 9. a second Ctrl-C drains too ----------------------------------------------------------
def test_9_a_second_sigint_drains_like_sigterm_and_the_final_save_runs(tmp_path: Path) -> None:
    import uvicorn

    from worldpm_reward.serving.app import draining_server

    state = tmp_path / "stats.json"
    shaping = ShapingConfig(normalize="running", state_file=str(state), state_sync_s=3600)
    app = create_app(FaultyScorer(slow_s=1.0), ServerConfig(), shaping)
    server = draining_server(uvicorn, app)(uvicorn.Config(app, port=0))
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit
    # an in-flight request during shutdown is answered, and the statistics are saved at the end
    with server_thread(app) as url:
        results: list[Any] = []
        caller = threading.Thread(
            target=lambda: results.append(
                httpx.post(f"{url}/v1/score", json={"samples": [conv("SLOW"), conv("ab")]}, timeout=30)
            )
        )
        caller.start()
        time.sleep(0.3)
        app.state.uvicorn_server.handle_exit(signal.SIGINT, None)  # server_thread's server: uvicorn's own
    caller.join(10)
    assert results and results[0].status_code == 200
    assert read_stats(state).count == 2


# -- 7. the request-id cache is bounded in bytes --------------------------------------------
def test_7_request_id_cache_is_bounded_in_bytes_and_errors_quote_a_prefix() -> None:
    async def scenario() -> RecentRequests:
        cache = RecentRequests(size=4096, max_bytes=50_000)
        for i in range(100):

            async def answer(i: int = i) -> dict[str, Any]:
                return {"results": [{"error": "x" * 10_000, "i": i}]}

            await cache.once(("score", str(i), b""), answer)
        return cache

    cache = asyncio.run(scenario())
    assert cache.bytes <= 50_000 and len(cache._entries) <= 5
    from worldpm_reward.errors import SampleError
    from worldpm_reward.samples import parse_sample

    with pytest.raises(SampleError) as info:
        parse_sample([{"role": "x" * 100_000, "content": "a"}, {"role": "assistant", "content": "b"}], 0)
    assert len(str(info.value)) < 300
    with pytest.raises(SampleError) as info:
        parse_sample({"k" * 100_000: 1}, 0)
    assert len(str(info.value)) < 400


# -- 11. fairness in tokens -------------------------------------------------------------------
def test_11_a_small_request_waits_at_most_one_piece_behind_a_token_heavy_one() -> None:
    from worldpm_reward.batcher import DynamicBatcher

    batches: list[list[Any]] = []

    def score(samples: Any) -> list[ScoreResult]:
        batches.append(list(samples))
        time.sleep(0.05 * sum(len(s[-1]["content"]) for s in samples) / 30_000)
        return [ScoreResult(score=1.0) for _ in samples]

    async def scenario() -> int:
        batcher = DynamicBatcher(
            FnScorer(score), max_batch_samples=256, max_wait_s=0.0, max_batch_tokens=40_000
        )
        batcher.start()
        heavy = asyncio.ensure_future(batcher.submit([conv("w " * 45_000)] * 6, client="heavy"))
        await asyncio.sleep(0)
        small = await batcher.submit([conv("hi"), conv("there")], client="small")
        assert len(small) == 2
        done_at = len(batches)
        await heavy
        await batcher.stop()
        return done_at

    done_at = asyncio.run(scenario())
    assert done_at <= 2, [len(b) for b in batches]  # behind at most one heavy piece


# -- 12. the command line ---------------------------------------------------------------------
def test_12_cli_refuses_destructive_or_empty_runs_with_one_error_line(tmp_path: Path, capsys: Any) -> None:
    from worldpm_reward.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": conv("a")}) + "\n")
    cases = [
        (["score", "--model", "m", str(src), "-o", str(src)], "is the input file"),
        (
            ["score", "--model", "m", str(src), "-o", str(tmp_path / "out.jsonl"), "--chunk-size", "0"],
            "--chunk-size",
        ),
        (
            ["score", "--model", "m", str(src), "-o", str(tmp_path / "o"), "--chunk-size", "-1"],
            "--chunk-size",
        ),
        (["score", "--model", "m", str(src), "-o", str(tmp_path)], "is a directory"),
        (["score", "--model", "m", str(tmp_path / "missing.jsonl"), "-o", "-"], "not a file"),
        (
            ["calibrate", "--model", "m", str(src), "-o", str(tmp_path / "c.json"), "--chunk-size", "0"],
            "--chunk-size",
        ),
    ]
    for argv, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert json.loads(src.read_text())["messages"][1]["content"] == "a"  # the input is intact


@pytest.mark.slow
def test_12_errors_name_the_input_line(tmp_path: Path, tiny_worldpm: Path) -> None:
    from worldpm_reward.cli import main

    lines = [json.dumps({"messages": conv(f"reply {i}")}) for i in range(7)]
    lines[5] = json.dumps({"prompt": "q", "response": ""})  # line 6, in the second chunk of 3
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(tiny_worldpm),
                "--device",
                "cpu",
                "--chunk-size",
                "3",
                str(src),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[5]["error"].startswith("line 6") and "sample" not in rows[5]["error"]


@pytest.mark.slow
def test_12_a_closed_stdout_ends_quietly(tmp_path: Path, tiny_worldpm: Path) -> None:
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": conv(f"r{i}")}) + "\n" for i in range(200)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worldpm_reward.cli",
            "score",
            "--model",
            str(tiny_worldpm),
            "--device",
            "cpu",
            "--chunk-size",
            "1",
            str(src),
            "-o",
            "-",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(120)
    assert "Traceback" not in err and "BrokenPipe" not in err


# -- 13. auth -----------------------------------------------------------------------------------
def test_13_auth_refuses_open_public_serving_strips_the_token_and_guards_docs(monkeypatch: Any) -> None:
    from worldpm_reward.errors import ConfigError
    from worldpm_reward.serving.config import resolve_token

    monkeypatch.setenv("WORLDPM_REWARD_TOKEN", "")
    with pytest.raises(ConfigError, match="--no-auth"):
        resolve_token(ServerConfig(host="0.0.0.0"))
    resolve_token(ServerConfig(host="0.0.0.0", allow_no_auth=True))
    resolve_token(ServerConfig(host="127.0.0.1"))
    monkeypatch.setenv("WORLDPM_REWARD_TOKEN", "s3cret\n")
    cfg = ServerConfig(host="0.0.0.0")
    resolve_token(cfg)
    assert cfg.token == "s3cret"
    app = create_app(FaultyScorer(), cfg)
    with server_thread(app) as url:
        client = RemoteScorer(url, token="s3cret\n", retries=0)
        try:
            assert client.score_detailed([conv("abc")])[0].score == expected_score("abc")
        finally:
            client.close()
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(f"{url}{path}", timeout=5).status_code in (401, 404), path
    open_app = create_app(FaultyScorer())
    with server_thread(open_app) as url:
        assert httpx.get(f"{url}/openapi.json", timeout=5).status_code == 200  # no token: docs stay on


# -- 14. one sample-validation path --------------------------------------------------------------
def test_14_validation_is_the_same_on_both_protocols() -> None:
    from worldpm_reward.errors import SampleError
    from worldpm_reward.samples import parse_sample

    with pytest.raises(SampleError, match="not both"):
        parse_sample({"messages": conv("a"), "prompt": "p", "response": "r"}, 0)
    with pytest.raises(SampleError, match="user"):
        parse_sample([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], 0)
    app = create_app(FaultyScorer(), ServerConfig(), ShapingConfig(reference="difference"))
    q = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nabc<|im_end|>"
    with server_thread(app) as url:
        native = httpx.post(
            f"{url}/v1/score", json={"samples": [{"messages": conv("abc"), "reference": 42}]}, timeout=30
        ).json()["results"][0]
        openrlhf = httpx.post(f"{url}/get_reward", json={"query": [q], "labels": [42]}, timeout=30)
    assert native["error"] and "reference" in native["error"]
    # the same refusal on /get_reward: the fallback reward (the default) with the error naming it
    assert openrlhf.status_code == 200, openrlhf.text
    assert openrlhf.json()["rewards"] == [DEFAULT_FALLBACK_REWARD]
    assert "reference" in json.dumps(openrlhf.json()["errors"])


# -- acceptance: a real `worldpm-reward serve` pair, one scorer child stopped -----------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def _open_sockets() -> int:
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if _is_socket(fd))


def _is_socket(fd: Path) -> bool:
    try:
        return os.readlink(fd).startswith("socket:")
    except OSError:
        return False


@pytest.mark.slow
def test_2_acceptance_one_of_two_replicas_scorer_child_stopped(tiny_worldpm: Path, tmp_path: Path) -> None:
    """The issue's figure: two `worldpm-reward serve` replicas (default settings), one's scorer
    child SIGSTOPped (its /health kept saying 200 before): >= 200 consecutive RemoteScorer
    calls (default settings) each take <= 1 s with the right scores, and the client's
    threads and sockets do not grow."""
    from wpr_servers import server_process
    from wpr_testutils import real_conversations

    from worldpm_reward import RewardModel

    convs = real_conversations(40)
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(convs)
    with (
        server_process(tiny_worldpm, log=tmp_path / "a.log") as (url_a, proc_a),
        server_process(tiny_worldpm, log=tmp_path / "b.log") as (url_b, _),
    ):
        client = RemoteScorer([url_a, url_b])
        try:
            for i in range(
                80
            ):  # warm latencies observed (the window is 64): the automatic hedge delay applies
                client.score_detailed([convs[i % len(convs)]])
            (child,) = [
                c for c in _children(proc_a.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            ]  # the scorer process (not multiprocessing's resource tracker)
            threads, sockets = threading.active_count(), _open_sockets()
            os.kill(child, signal.SIGSTOP)
            walls: list[float] = []
            worst_diff = 0.0
            for i in range(240):
                k = i % len(convs)
                start = time.monotonic()
                got = client.score_detailed([convs[k]])
                walls.append(time.monotonic() - start)
                assert got[0].error is None
                worst_diff = max(worst_diff, abs(got[0].score - want[k]))
            print(
                f"acceptance: {len(walls)} calls, worst {max(walls):.3f} s, p50 {sorted(walls)[len(walls) // 2]:.3f} s, "
                f"hedges {client.stats['hedges']}, threads {threads}->{threading.active_count()}, "
                f"sockets {sockets}->{_open_sockets()}, max |diff| {worst_diff:.1e}"
            )
            assert max(walls) <= 1.0, sorted(walls)[-5:]
            assert worst_diff <= 1e-4
            assert threading.active_count() <= threads + 1
            assert _open_sockets() <= sockets + 4
        finally:
            with contextlib.suppress(ProcessLookupError, ValueError, UnboundLocalError):
                os.kill(child, signal.SIGCONT)
            client.close()
