"""Hosting a reward model for other processes: the HTTP protocol, its batching queue, the
app, and the client.

  * :mod:`.queue`: cross-request dynamic batching on the event loop, fair across clients,
    bounded in samples and estimated tokens (``DynamicBatcher``);
  * :mod:`.worker`: the scorer in its own process (``ProcessScorer``), so the front end never
    waits for the model's GIL;
  * :mod:`.protocol`: OpenRLHF's ``/get_reward`` and the native ``/v1/score``, independent
    of any web framework (``RewardService``), shared by the HTTP app and Ray Serve;
  * :mod:`.app`: the FastAPI app and ``run_server`` (``worldpm-reward serve``);
  * :mod:`.client`: ``RemoteScorer``, the httpx client with the one retry/hedge/failover
    policy (per-attempt timeout and deadline, health probes, Retry-After, request ids).

Importing this package loads no web framework: FastAPI/uvicorn (extra ``serve``) and httpx
(extra ``client``) are imported when an app or a request is made.
"""

from worldpm_reward.serving.app import ServerConfig, create_app, run_server, wait_until_ready
from worldpm_reward.serving.client import RemoteScorer
from worldpm_reward.serving.protocol import RewardService

__all__ = ["RemoteScorer", "RewardService", "ServerConfig", "create_app", "run_server", "wait_until_ready"]
