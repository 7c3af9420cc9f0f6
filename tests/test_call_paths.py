"""From the in-process surfaces (RewardModel, TRL's reward function, the CLI's score and
calibrate) down to the forward pass, a sample's path goes strictly down the package: recorded
from the real call stack at the backbone's token embedding (a global forward pre-hook; every
forward, transformers' or the fused one, starts there), no module entered twice. The serving surfaces are checked in tests/serving/test_paths.py."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worldpm_reward import RewardModel

CONVS = [
    [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    for i in range(3)
]


def _runs(frames: list[inspect.FrameInfo]) -> list[str]:
    """The worldpm_reward modules on the stack, outermost first, adjacent repeats collapsed."""
    names = [f.frame.f_globals.get("__name__", "") for f in reversed(frames)]
    names = [n for n in names if n.startswith("worldpm_reward.")]
    return [m for i, m in enumerate(names) if i == 0 or names[i - 1] != m]


@pytest.fixture
def forward_paths() -> Iterator[list[list[str]]]:
    """The package path of every backbone forward call made while the test runs."""
    paths: list[list[str]] = []

    def record(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, torch.nn.Embedding):  # the backbone's first step, whoever runs it
            paths.append(_runs(inspect.stack()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield paths
    finally:
        handle.remove()


def _check(paths: list[list[str]], surface: str) -> list[str]:
    assert paths, "no forward pass was recorded"
    for path in paths:
        assert path[0] == surface, path
        assert len(path) == len(set(path)), f"a module is entered twice: {path}"
        assert path.index("worldpm_reward.scoring") < path.index("worldpm_reward.engines.transformers"), path
    return paths[0]


def test_reward_model_goes_down_to_the_forward(reward_model: RewardModel, forward_paths) -> None:
    reward_model.score(CONVS)
    path = _check(forward_paths, "worldpm_reward.scoring")
    # the packed rows run the backbone: fused on CPU in fp32, else through packing.score_packed
    assert (
        "worldpm_reward.fused" if reward_model.engine.fused is not None else "worldpm_reward.packing"
    ) in path


def test_trl_reward_function_goes_down_to_the_forward(reward_model: RewardModel, forward_paths) -> None:
    from worldpm_reward.integrations.trl import WorldPMReward

    reward = WorldPMReward(scorer=reward_model)
    rewards = reward([c[:1] for c in CONVS], [c[1:] for c in CONVS])
    assert all(isinstance(r, float) for r in rewards)
    path = _check(forward_paths, "worldpm_reward.integrations.trl")
    assert path.index("worldpm_reward.rewards") < path.index("worldpm_reward.scoring"), path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["score", "calibrate"])
def test_cli_goes_down_to_the_forward(
    command: str, tiny_worldpm: Path, tmp_path: Path, forward_paths
) -> None:
    from worldpm_reward.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    out = tmp_path / ("out.jsonl" if command == "score" else "calib.json")
    assert main([command, "--model", str(tiny_worldpm), "--device", "cpu", str(src), "-o", str(out)]) == 0
    path = _check(forward_paths, "worldpm_reward.cli")
    if command == "calibrate":  # shaping's view of the scores, like every reward surface
        assert path.index("worldpm_reward.rewards") < path.index("worldpm_reward.scoring"), path
    else:  # raw scores: straight to the scorer (jsonl.py only reads and writes lines)
        assert "worldpm_reward.rewards" not in path and "worldpm_reward.jsonl" not in path, path
