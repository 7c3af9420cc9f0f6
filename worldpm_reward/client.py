"""Deprecated alias: the client moved to :mod:`worldpm_reward.serving.client`."""

import warnings

from worldpm_reward.serving.client import RETRYABLE, RemoteScorer

warnings.warn(
    "worldpm_reward.client is deprecated; import RemoteScorer from worldpm_reward.serving.client",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["RETRYABLE", "RemoteScorer"]
