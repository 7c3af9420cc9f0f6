"""worldpm-reward: faithful, fast WorldPM reward scoring for RL training.

The core knows no training framework: it loads reward-model checkpoints (one module per
model family in ``worldpm_reward.families``), formats conversations in the model's own
format, and scores batches (``RewardModel``). ``worldpm_reward.serving`` hosts a model for
other processes; framework adapters live in ``worldpm_reward.integrations``.
"""

from typing import TYPE_CHECKING, Any

from worldpm_reward.config import ModelConfig
from worldpm_reward.errors import (
    BatchScoringError,
    CheckpointError,
    ConfigError,
    SampleError,
    WorldPMRewardError,
)
from worldpm_reward.samples import Sample, Scorer, ScoreResult, parse_sample

if TYPE_CHECKING:
    from worldpm_reward.scoring import RewardModel


def __getattr__(name: str) -> Any:
    # RewardModel needs torch and transformers: imported on first use, so that `import
    # worldpm_reward` and `worldpm-reward --help` stay light (engines are registered by name).
    if name == "RewardModel":
        from worldpm_reward.scoring import RewardModel

        return RewardModel
    raise AttributeError(f"module 'worldpm_reward' has no attribute {name!r}")


__all__ = [
    "BatchScoringError",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "RewardModel",
    "Sample",
    "SampleError",
    "ScoreResult",
    "Scorer",
    "WorldPMRewardError",
    "parse_sample",
]
__version__ = "0.1.0"
