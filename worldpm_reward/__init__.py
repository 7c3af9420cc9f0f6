"""worldpm-reward: faithful, fast WorldPM reward scoring for RL training.

The core knows no training framework: it loads reward-model checkpoints (one module per
model family in ``worldpm_reward.families``), formats conversations in the model's own
format, and scores batches (``RewardModel``). ``worldpm_reward.serving`` hosts a model for
other processes; framework adapters live in ``worldpm_reward.integrations``.
"""

from worldpm_reward.config import ModelConfig
from worldpm_reward.engines import sharded as _sharded  # noqa: F401  (registers engine="fsdp")
from worldpm_reward.engines import vllm_engine as _vllm_engine  # noqa: F401  (registers engine="vllm")
from worldpm_reward.errors import (
    BatchScoringError,
    CheckpointError,
    ConfigError,
    SampleError,
    WorldPMRewardError,
)
from worldpm_reward.samples import Sample, Scorer, ScoreResult, parse_sample
from worldpm_reward.scoring import RewardModel

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
