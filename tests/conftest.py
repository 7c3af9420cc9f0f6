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
