"""worldpm-reward: faithful, fast WorldPM reward scoring for RL training.

The core (this package) knows no training framework: it loads reward-model checkpoints,
formats conversations in the model's own format, and scores batches. Framework adapters
live in ``worldpm_reward.integrations``.
"""

from worldpm_reward.errors import BatchScoringError, CheckpointError, SampleError, WorldPMRewardError
from worldpm_reward.samples import Sample, ScoreResult, parse_sample
from worldpm_reward.scoring import RewardModel, Scorer

__all__ = [
    "BatchScoringError",
    "CheckpointError",
    "RewardModel",
    "Sample",
    "SampleError",
    "ScoreResult",
    "Scorer",
    "WorldPMRewardError",
    "parse_sample",
]
__version__ = "0.1.0"
