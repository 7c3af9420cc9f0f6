"""WorldPM as a Ray Serve deployment on a local Ray cluster started by this test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'")

from wpr_servers import free_port  # noqa: E402
from wpr_testutils import real_conversations  # noqa: E402

from worldpm_reward import RewardModel  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Our own local cluster; we stop only what we started (never `ray stop`)."""
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_deployment_http_and_handle_give_the_same_scores(cluster: str, tiny_worldpm: Path) -> None:
    from worldpm_reward.integrations.ray_serve import build_app

    app = build_app(
        str(tiny_worldpm), num_gpus=0, num_cpus=0.5, model_kwargs={"device": "cpu"}, batch_wait_timeout_s=0.02
    )
    handle = serve.run(app, name="worldpm", route_prefix="/")
    convs = real_conversations(24)
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(convs)

    via_handle = handle.score.remote([{"messages": c} for c in convs]).result()
    http = httpx.post(f"{cluster}/v1/score", json={"samples": [{"messages": c} for c in convs]}, timeout=120)
    assert http.status_code == 200
    got_h = [r["score"] for r in via_handle["results"]]
    got_x = [r["score"] for r in http.json()["results"]]
    assert max(abs(a - b) for a, b in zip(got_h, want)) <= 1e-4
    assert got_h == got_x

    # OpenRLHF's protocol through both paths, and the reward-function file via the handle
    prompt = "<|im_start|>user\nTips for better sleep?<|im_end|>\n<|im_start|>assistant\n"
    query = prompt + "Keep a schedule.<|im_end|>"
    direct = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(
        [
            [
                {"role": "user", "content": "Tips for better sleep?"},
                {"role": "assistant", "content": "Keep a schedule."},
            ]
        ]
    )[0]
    r_http = httpx.post(
        f"{cluster}/get_reward", json={"query": [query], "prompts": [prompt], "labels": [None]}, timeout=60
    )
    r_handle = handle.get_reward.remote([query], [prompt], [None]).result()
    assert r_http.status_code == 200 and r_http.json()["rewards"] == r_handle["rewards"]
    assert abs(r_handle["rewards"][0] - direct) <= 1e-4

    import importlib.util

    from worldpm_reward.integrations.openrlhf import REWARD_FUNC_FILE

    spec = importlib.util.spec_from_file_location("reward_func", REWARD_FUNC_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.environ["WORLDPM_REWARD_RAY_APP"] = "worldpm"
    try:
        out = module.reward_func([query], [prompt], [None])
    finally:
        del os.environ["WORLDPM_REWARD_RAY_APP"]
    assert out["rewards"] == r_handle["rewards"]

    # bad items: 422 over HTTP, a ValueError naming the item through the handle
    bad = "<|im_start|>user\nhi<|im_end|>\n"
    assert httpx.post(f"{cluster}/get_reward", json={"query": [bad]}, timeout=60).status_code == 422
    with pytest.raises(Exception, match="index"):
        handle.get_reward.remote([bad], None, None).result()
    assert httpx.get(f"{cluster}/health", timeout=30).status_code == 200
