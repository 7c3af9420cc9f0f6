"""The serving wing's shape (issue 19): every surface reaches the scorer going strictly down
the package (no module entered twice), each sample is parsed and estimated once per request,
a Ray Serve-style service gets no batcher, and the body-size limit's 503 honours
``retry_after_s``. In-process servers with a fake scorer: no model, a few seconds."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from wpr_servers import server_thread

from worldpm_reward import batcher as batcher_module
from worldpm_reward import samples as samples_module
from worldpm_reward.samples import ScoreResult
from worldpm_reward.serving import ServerConfig, create_app

QUERY = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"


def _conv(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def _package_modules(frames: Sequence[Any]) -> list[str]:
    """The worldpm_reward modules of ``frames``, outermost first."""
    names = [f.frame.f_globals.get("__name__", "") for f in reversed(frames)]
    return [n for n in names if n.startswith("worldpm_reward.")]


def _reentered(path: list[str]) -> list[str]:
    """Modules that appear in two non-adjacent places of ``path``."""
    runs = [m for i, m in enumerate(path) if i == 0 or path[i - 1] != m]
    return sorted({m for m in runs if runs.count(m) > 1})


class RecordingScorer:
    """A sync scorer that records the worldpm_reward modules on its thread's stack."""

    def __init__(self) -> None:
        self.stacks: list[list[str]] = []
        self.lock = threading.Lock()

    def score_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
        with self.lock:
            self.stacks.append(_package_modules(inspect.stack()))
        return [ScoreResult(score=0.5, num_tokens=3) for _ in samples]


@pytest.mark.parametrize("endpoint", ["/v1/score", "/get_reward"])
def test_a_sample_goes_strictly_down_from_the_route_to_the_scorer(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path of one request: the route (serving.app), then the frames of the task that
    submits to the batcher, then the frames of the batcher's scorer thread; no module may
    appear in two non-adjacent places (the old app re-entered serving/app.py through its
    batcher's score_fn closure)."""
    submitted: list[list[str]] = []
    original = batcher_module.DynamicBatcher.ascore_detailed

    async def recording(self: Any, samples: Sequence[Any]) -> list[ScoreResult]:
        submitted.append([*_package_modules(inspect.stack()), "worldpm_reward.batcher"])
        return await original(self, samples)

    monkeypatch.setattr(batcher_module.DynamicBatcher, "ascore_detailed", recording)
    scorer = RecordingScorer()
    body = {"samples": [_conv(0)]} if endpoint == "/v1/score" else {"query": [QUERY]}
    with server_thread(create_app(scorer, ServerConfig())) as url:
        r = httpx.post(url + endpoint, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert len(submitted) == 1 and len(scorer.stacks) == 1
    path = ["worldpm_reward.serving.app", *submitted[0], *scorer.stacks[0]]
    assert _reentered(path) == [], path
    # the scorer is called by the batcher's worker thread directly: no closure of the app between
    assert scorer.stacks[0] == [], scorer.stacks[0]


def test_reentry_check_finds_a_module_entered_twice() -> None:
    assert _reentered(["a", "a", "b", "c"]) == []
    assert _reentered(["a", "b", "a"]) == ["a"]


@pytest.mark.parametrize("endpoint", ["/v1/score", "/get_reward"])
def test_each_sample_is_parsed_and_estimated_once_per_request(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation of a message list and the token estimate each run once per sample on the
    server path (size check, batcher queue bound, scorer), not once per layer."""
    checks: list[str] = []
    estimates: list[int] = []
    check_messages, estimate = samples_module._check_messages, samples_module._estimate

    def counting_check(value: Any, **kw: Any) -> Any:
        if kw.get("final_assistant"):
            checks.append(kw.get("field", ""))
        return check_messages(value, **kw)

    def counting_estimate(sample: Any) -> int:
        estimates.append(1)
        return estimate(sample)

    monkeypatch.setattr(samples_module, "_check_messages", counting_check)
    monkeypatch.setattr(samples_module, "_estimate", counting_estimate)
    n = 5
    body = {"samples": [_conv(i) for i in range(n)]} if endpoint == "/v1/score" else {"query": [QUERY] * n}
    with server_thread(create_app(RecordingScorer(), ServerConfig())) as url:
        checks.clear()
        estimates.clear()
        r = httpx.post(url + endpoint, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert len(checks) == n, checks
    assert len(estimates) == n, estimates


def test_a_service_given_to_create_app_gets_no_batcher_and_health_reports_none() -> None:
    """Ray Serve's shape: the host builds the service around its own AsyncScorer; create_app
    only routes, so no batcher that never runs is built or reported."""
    from worldpm_reward.serving import RewardService

    class Async:
        async def ascore_detailed(self, samples: Sequence[Any]) -> list[ScoreResult]:
            return [ScoreResult(score=1.0, num_tokens=2) for _ in samples]

    app = create_app(RewardService(Async()), ServerConfig())
    assert app.state.batcher is None
    with server_thread(app) as url:
        health = httpx.get(url + "/health", timeout=10)
        r = httpx.post(url + "/v1/score", json={"samples": [_conv(0)]}, timeout=10)
    assert health.status_code == 200 and "queued_samples" not in health.json()
    assert r.json()["results"][0]["score"] == 1.0


def test_the_upload_bound_503_carries_the_configured_retry_after() -> None:
    cfg = ServerConfig(max_upload_bytes=64, retry_after_s=7)
    with server_thread(create_app(RecordingScorer(), cfg)) as url:
        r = httpx.post(url + "/v1/score", json={"samples": [_conv(i) for i in range(20)]}, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "7", (r.status_code, r.headers)


def test_verl_async_goes_down_through_the_batcher_without_fake_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """veRL's compute_score_async: verl -> batcher -> rewards -> scorer (it used to go verl ->
    serving.queue -> back into verl, with errors smuggled through the batcher as fake samples);
    a sample without a prompt never reaches the batcher."""
    import asyncio

    from worldpm_reward.integrations import verl

    submitted: list[list[str]] = []
    original = batcher_module.DynamicBatcher.ascore_detailed

    async def recording(self: Any, samples: Sequence[Any]) -> list[ScoreResult]:
        submitted.append([*_package_modules(inspect.stack()), "worldpm_reward.batcher"])
        assert all(isinstance(s, dict) for s in samples), samples
        return await original(self, samples)

    monkeypatch.setattr(batcher_module.DynamicBatcher, "ascore_detailed", recording)
    settings = {"url": "http://127.0.0.1:9", "report_every_s": 3600.0, "shaping": {}}
    scorer = RecordingScorer()
    verl._backend(settings).reward.scorer = scorer

    async def go() -> list[dict[str, float]]:
        return list(
            await asyncio.gather(
                verl.compute_score_async("x", "hello", "", {"prompt": "hi"}, **settings),
                verl.compute_score_async("x", "hello", "", {}, **settings),  # no prompt
            )
        )

    good, bad = asyncio.run(go())
    assert good == {"score": 0.5, "worldpm_raw": 0.5, "worldpm_failed": 0.0}
    assert bad["worldpm_failed"] == 1.0
    assert len(submitted) == 1 and len(scorer.stacks) == 1
    path = [*submitted[0], *scorer.stacks[0]]
    assert _reentered(path) == [], path
    assert path[0] == "worldpm_reward.integrations.verl" and path[-1] == "worldpm_reward.rewards", path
