"""WorldPM as a Ray Serve deployment on a local Ray cluster started by this test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'")

from wpr_testutils import real_conversations  # noqa: E402

from worldpm_reward import RewardModel  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(ray_serve_url: str):
    """The run's shared Ray cluster (conftest); this module's applications are deleted after it."""
    try:
        yield ray_serve_url
    finally:
        for name in ("worldpm", "worldpm-two"):
            serve.delete(name)


@pytest.mark.slow
def test_deployment_http_and_handle_give_the_same_scores(cluster: str, tiny_worldpm: Path) -> None:
    from worldpm_reward.integrations.ray_serve import build_app

    app = build_app(
        {
            "model": str(tiny_worldpm),
            "num_gpus": 0,
            "num_cpus": 0.5,
            "model_kwargs": {"device": "cpu"},
            "batch_wait_timeout_s": 0.02,
        }
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
    # both paths went through the @serve.batch method, which coalesced the samples
    stats = handle.batch_stats.remote().result()
    assert stats["batched_samples"] == 2 * len(convs)
    assert 2 <= stats["batch_calls"] <= stats["batched_samples"] // 4

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

    # a bad item (no reply): OpenRLHF's default fallback (-10, flagged, the error naming the
    # item) over HTTP and through the handle alike; its batch-mate keeps its real reward
    from worldpm_reward.serving.protocol import DEFAULT_FALLBACK_REWARD

    bad = "<|im_start|>user\nhi<|im_end|>\n"
    via_http = httpx.post(f"{cluster}/get_reward", json={"query": [bad, query]}, timeout=60)
    assert via_http.status_code == 200, via_http.text
    for out in (via_http.json(), handle.get_reward.remote([bad, query], None, None).result()):
        assert out["rewards"][0] == DEFAULT_FALLBACK_REWARD
        assert abs(out["rewards"][1] - direct) <= 1e-4
        assert out["extra_logs"]["worldpm_failed"] == [1.0, 0.0]
        assert [e["index"] for e in out["errors"]] == [0] and out["errors"][0]["error"]
    health = httpx.get(f"{cluster}/health", timeout=30)
    # Ray Serve batches with @serve.batch: no batcher of the server's own is built or reported
    assert health.status_code == 200 and "queued_samples" not in health.json()


@pytest.mark.slow
def test_killed_replica_is_replaced_and_a_retrying_client_loses_nothing(
    cluster: str, tiny_worldpm: Path
) -> None:
    import time

    from worldpm_reward.integrations.ray_serve import build_app
    from worldpm_reward.serving.client import RemoteScorer

    app = build_app(
        {
            "model": str(tiny_worldpm),
            "num_gpus": 0,
            "num_cpus": 0.25,
            "replicas": 2,
            "model_kwargs": {"device": "cpu"},
            "health_check_period_s": 1.0,
        }
    )
    serve.run(app, name="worldpm-two", route_prefix="/two")
    convs = real_conversations(48)
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(convs)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "worldpm-two" in a["name"]]
    assert len(replicas) == 2, replicas

    class KillAfterThreeChunks(RemoteScorer):
        sent = 0

        def _post(self, path: str, payload: dict) -> object:
            KillAfterThreeChunks.sent += 1
            if KillAfterThreeChunks.sent == 4:
                victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
                ray.kill(victim, no_restart=True)
            return super()._post(path, payload)

    scorer = KillAfterThreeChunks(f"{cluster}/two", max_chunk=4, retries=8, backoff_s=0.2, timeout_s=60)
    got = [r.score for r in scorer.score_detailed([{"messages": c} for c in convs])]
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) <= 1e-4  # none lost or mixed

    def replica_names() -> set[str]:
        return {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "worldpm-two" in a["name"]
        }

    def running() -> int:
        status = serve.status().applications["worldpm-two"].deployments["WorldPMDeployment"]
        return status.replica_states.get("RUNNING", 0)

    deadline = time.monotonic() + 120  # Serve's controller starts a replacement replica
    while time.monotonic() < deadline:
        names = replica_names()
        if replicas[0]["name"] not in names and len(names) == 2 and running() == 2:
            break
        time.sleep(1)
    names = replica_names()
    assert replicas[0]["name"] not in names and len(names) == 2 and running() == 2, names
    again = [r.score for r in scorer.score_detailed([{"messages": c} for c in convs[:8]])]
    assert max(abs(a - b) for a, b in zip(again, want[:8])) <= 1e-4  # the new replica scores too


@pytest.mark.slow
def test_the_example_serve_config_file_deploys_with_serve_run(
    cluster: str, tiny_worldpm: Path, tmp_path: Path
) -> None:
    """recipes/configs/ray_serve_worldpm.yaml, its model and resources swapped for the tiny
    checkpoint on CPU, deployed by Serve's own CLI (`serve run CONFIG`, as a RayService does
    from the same document) onto this test's cluster: its two replicas give the same,
    stateless rewards, and a killed replica costs an OpenRLHF-style client (5 tries, 1 s
    apart) no reward."""
    import shutil
    import subprocess
    import threading
    import time

    import yaml

    example = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "ray_serve_worldpm.yaml"
    config = yaml.safe_load(example.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "worldpm_reward.integrations.ray_serve:build_app"
    assert app["args"]["autoscaling"]["min_replicas"] >= 2  # survives a replica loss
    assert app["args"]["shaping"].get("normalize", "none") == "none"  # no per-replica statistics
    app.update(name="worldpm-config", route_prefix="/fromconfig")
    app["args"].update(model=str(tiny_worldpm), num_gpus=0, num_cpus=0.25, model_kwargs={"device": "cpu"})
    app["args"]["autoscaling"].update(max_replicas=2)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = shutil.which("serve") or str(Path(sys.executable).with_name("serve"))
    gcs = ray.get_runtime_context().gcs_address
    run = subprocess.run(
        [serve_cli, "run", "--non-blocking", "--address", gcs, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    try:
        deadline = time.time() + 480  # two replicas on a loaded 2-core machine
        convs = real_conversations(6)
        body = {"samples": [{"messages": c} for c in convs]}
        r = None
        while time.time() < deadline:
            try:  # replicas still starting: a refused or slow first request is not a failure
                r = httpx.post(f"{cluster}/fromconfig/v1/score", json=body, timeout=60)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                break
            time.sleep(2)
        assert r is not None and r.status_code == 200, r and r.text
        rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
        want = rm.score(convs)
        results = r.json()["results"]
        assert max(abs(x["score"] - w) for x, w in zip(results, want)) <= 1e-4
        # the file's shaping reached the replica: the raw score clipped to [-5, 5]; the very
        # first reward of a fresh deploy is a real one (running normalization made it 0.0)
        assert all(abs(x["reward"] - min(max(x["score"], -5.0), 5.0)) <= 1e-6 for x in results)
        assert results[0]["reward"] != 0.0
        # and its server options: OpenRLHF fallback rewards
        bad = "<|im_start|>user\nhi<|im_end|>\n"
        g = httpx.post(f"{cluster}/fromconfig/get_reward", json={"query": [bad]}, timeout=60)
        assert g.status_code == 200 and g.json()["rewards"] == [-5.0]

        def running() -> int:
            status = serve.status().applications["worldpm-config"].deployments["WorldPMDeployment"]
            return status.replica_states.get("RUNNING", 0)

        while time.time() < deadline and running() < 2:
            time.sleep(1)
        replicas = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if "worldpm-config" in a["name"]
        ]
        assert running() == 2 and len(replicas) == 2, replicas

        # OpenRLHF's client policy: one sample per request, 5 tries 1 s apart; kill a replica
        queries = [
            f"<|im_start|>user\n{c[-2]['content']}<|im_end|>\n<|im_start|>assistant\n{c[-1]['content']}<|im_end|>"
            for c in convs
        ] * 4
        rewards: list[float | None] = [None] * len(queries)
        retried = [0]

        def client(i: int) -> None:
            for _attempt in range(5):
                try:
                    resp = httpx.post(
                        f"{cluster}/fromconfig/get_reward", json={"query": [queries[i]]}, timeout=60
                    )
                    if resp.status_code == 200:
                        rewards[i] = resp.json()["rewards"][0]
                        return
                except httpx.HTTPError:
                    pass
                retried[0] += 1
                time.sleep(1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(queries))]
        for k, t in enumerate(threads):
            t.start()
            if k == len(threads) // 3:
                victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
                ray.kill(victim, no_restart=True)
            time.sleep(0.05)
        for t in threads:
            t.join(timeout=120)
        assert all(r is not None for r in rewards), (rewards, retried)  # no sample lost its reward
        per_query = {}
        for q, r in zip(queries, rewards):
            per_query.setdefault(q, []).append(float(r))  # type: ignore[arg-type]
        # every replica, in whatever batch, gives the same reward (within batch-shape float noise)
        assert all(max(v) - min(v) <= 1e-5 for v in per_query.values()), per_query
    finally:
        serve.delete("worldpm-config")
