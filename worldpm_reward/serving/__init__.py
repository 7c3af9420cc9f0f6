"""Hosting a reward model for other processes: the HTTP protocol, the app, and the client.

  * :mod:`.config`: ``ServerConfig`` (every server setting, and its ``serve`` flag) and the
    bearer token;
  * :mod:`.protocol`: OpenRLHF's ``/get_reward`` and the native ``/v1/score``, independent
    of any web framework (``RewardService``, around an ``AsyncScorer``), shared by the HTTP
    app and Ray Serve;
  * :mod:`.host`: the scorer's life behind the routes (loading, the cross-call batcher of
    :mod:`worldpm_reward.batcher`, drain);
  * :mod:`.app`: the FastAPI routes and ``run_server`` (``worldpm-reward serve``), with
    :mod:`.limits` (HTTP bounds), :mod:`.idempotency` (``X-Request-ID`` answers) and
    :mod:`.metrics` (Prometheus);
  * :mod:`.scorer_process`: the scorer in its own process (``ProcessScorer``), so the front
    end never waits for the model's GIL;
  * :mod:`.client`: ``RemoteScorer``, the httpx client with the one retry/hedge/failover
    policy (per-attempt timeout and deadline, health probes, Retry-After, request ids).

Importing this package loads no web framework: FastAPI/uvicorn (extra ``serve``) and httpx
(extra ``client``) are imported when an app or a request is made.
"""

from worldpm_reward.serving.app import create_app, run_server, wait_until_ready
from worldpm_reward.serving.client import RemoteScorer
from worldpm_reward.serving.config import ServerConfig
from worldpm_reward.serving.protocol import RewardService

__all__ = ["RemoteScorer", "RewardService", "ServerConfig", "create_app", "run_server", "wait_until_ready"]
