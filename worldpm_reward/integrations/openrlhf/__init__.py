"""OpenRLHF adapters.

Two ways to give OpenRLHF (0.11.x) WorldPM rewards:

1. The HTTP server, directly (recommended)::

       worldpm-reward serve --model Qwen/WorldPM-72B --device-map auto --host 0.0.0.0 --port 8000
       ... train_ppo_ray ... --reward.remote_url http://RM_HOST:8000/get_reward

2. The reward-function file :data:`REWARD_FUNC_FILE` (``--reward.remote_url /path/to/reward_func.py``),
   which OpenRLHF imports inside each rollout actor and calls once per sample. It forwards to
   the HTTP server(s) in ``WORLDPM_REWARD_URL`` or to the Ray Serve app in
   ``WORLDPM_REWARD_RAY_APP``. Print its path with ``worldpm-reward openrlhf-file``.
"""

from pathlib import Path

REWARD_FUNC_FILE = str(Path(__file__).with_name("reward_func.py"))

__all__ = ["REWARD_FUNC_FILE"]
