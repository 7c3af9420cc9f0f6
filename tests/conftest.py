from __future__ import annotations

from pathlib import Path

import pytest

from worldpm_reward.testing import write_tiny_worldpm


@pytest.fixture(scope="session")
def tiny_worldpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real WorldPM layout; chat template without <|endoftext|> (the model card's case)."""
    return write_tiny_worldpm(tmp_path_factory.mktemp("ckpt") / "tiny-worldpm", seed=0)


@pytest.fixture(scope="session")
def tiny_worldpm_eos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same layout, but the chat template itself appends <|endoftext|>; different seed."""
    return write_tiny_worldpm(
        tmp_path_factory.mktemp("ckpt") / "tiny-worldpm-eos", seed=1, template_appends_eos=True
    )


@pytest.fixture(scope="session")
def reward_model(tiny_worldpm: Path):
    from worldpm_reward import RewardModel

    return RewardModel.from_pretrained(tiny_worldpm, device="cpu")


#: the run's Ray cluster: the nodeid of the last selected test that uses it, and how to stop it
_RAY: dict = {"last": None, "stop": None}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item for item in items if "ray_serve_url" in getattr(item, "fixturenames", ())]
    _RAY["last"] = users[-1].nodeid if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the Ray cluster after the last test that uses it: its idle processes would
    otherwise take CPU from every later test."""
    if item.nodeid == _RAY["last"] and _RAY["stop"] is not None:
        _RAY["stop"]()


@pytest.fixture(scope="session")
def ray_serve_url():
    """The test run's one local Ray cluster with Serve's HTTP proxy on a free loopback port,
    started on first use and stopped after the last test that uses it (or at the end of the
    run). We stop only what we started: ``ray.shutdown()``, never ``ray stop``. Tests delete
    the applications they deploy."""
    import os
    import sys

    ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'")
    serve = pytest.importorskip(
        "ray.serve", reason="needs the 'ray' extra: pip install 'worldpm-reward[ray]'"
    )
    from worldpm_reward.testing.servers import free_port

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def stop() -> None:
        _RAY["stop"] = None
        serve.shutdown()
        ray.shutdown()

    _RAY["stop"] = stop
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if _RAY["stop"] is not None:
            stop()
