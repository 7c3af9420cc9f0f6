"""Ray Serve: WorldPM as a reward deployment on its own GPUs inside a Ray cluster.

    worldpm-reward-ray --model Qwen/WorldPM-72B --num-gpus 4 --model-kwargs '{"device_map": "auto"}' \\
        --address auto --host 0.0.0.0 --port 8000

or from a Serve config file / RayService (the app builder takes one dict of arguments)::

    applications:
      - name: worldpm
        route_prefix: /
        import_path: worldpm_reward.integrations.ray_serve:build_app
        args: {model: Qwen/WorldPM-72B, num_gpus: 4, model_kwargs: {device_map: auto}}

The deployment IS the HTTP app of ``worldpm-reward serve`` (``/get_reward`` for OpenRLHF,
``/v1/score``, ``/health``, ``/metrics``), mounted with Serve's own ``@serve.ingress``;
in-cluster callers use handle methods (OpenRLHF rollout actors through the reward-function
file with ``WORLDPM_REWARD_RAY_APP``)::

    handle = serve.get_app_handle("worldpm")
    handle.score.remote([{"prompt": "...", "response": "..."}]).result()     # like /v1/score
    handle.get_reward.remote(queries, prompts, labels).result()             # like /get_reward

Every path scores through one ``@serve.batch`` method (one sample per batch slot;
:class:`~worldpm_reward.integrations.ray_batch.ServeBatchScorer`), so concurrent HTTP and
handle requests share model calls; the replica's scorer then packs each batch into
token-budgeted micro-batches. The replica builds one
:class:`~worldpm_reward.serving.protocol.RewardService` around it and mounts the server's
routes on that service (no batcher of the server's own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worldpm_reward.errors import ConfigError, RequestError, SampleError, require_extra
from worldpm_reward.integrations.ray_batch import ServeBatchScorer
from worldpm_reward.serving.app import create_app
from worldpm_reward.serving.config import ServerConfig
from worldpm_reward.serving.protocol import RewardService
from worldpm_reward.shaping import ShapingConfig

serve = require_extra("ray.serve", "ray")
logger = logging.getLogger(__name__)

__all__ = ["RayServeConfig", "WorldPMDeployment", "build_app", "main"]


@serve.deployment
@serve.ingress()
class WorldPMDeployment:
    """One replica: a loaded reward model, the shared HTTP app and the handle methods."""

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        shaping: dict[str, Any] | None = None,
        server: dict[str, Any] | None = None,
        max_batch_size: int = 256,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        from worldpm_reward.scoring import RewardModel

        self.scorer = RewardModel.from_pretrained(model, **(model_kwargs or {}))
        self.batches = ServeBatchScorer(self.scorer, max_batch_size, batch_wait_timeout_s)
        config = ServerConfig(**(server or {}))
        self.service = RewardService(
            self.batches,
            shaping=ShapingConfig(**(shaping or {})),
            chat_format=config.chat_format,
            reply_turns=config.reply_turns,
            name=config.name,
            max_items=config.max_items,
            fallback_reward=config.fallback_reward,
            scores=config.openrlhf_scores,
            scores_temperature=config.scores_temperature,
            max_request_tokens=config.max_request_tokens,
        )
        self.http_app = create_app(self.service, config)

    def __serve_build_asgi_app__(self) -> Any:
        """Serve mounts this replica's FastAPI app (built in __init__, around the loaded model)."""
        return self.http_app

    async def score(self, samples: list[Any]) -> dict[str, Any]:
        """Handle path of /v1/score: per-item results for a list of samples."""
        return await self.service.score(samples)

    async def get_reward(
        self, query: list[str], prompts: list[str] | None = None, labels: list[Any] | None = None
    ) -> dict[str, Any]:
        """Handle path of OpenRLHF's /get_reward; raises SampleError (a ValueError) naming bad items."""
        try:
            return await self.service.get_reward(query, prompts, labels)
        except RequestError as exc:  # its (status, detail) does not survive Ray's pickling: one message
            raise SampleError(f"HTTP {exc.status}: {json.dumps(exc.detail)}") from None

    def batch_stats(self) -> dict[str, int]:
        """How many ``@serve.batch`` calls this replica made, and the samples they held."""
        return {"batch_calls": self.batches.batch_calls, "batched_samples": self.batches.batched_samples}

    def check_health(self) -> None:
        """Serve's periodic replica health check: a replica whose model failed a whole batch
        (a CUDA error, a lost device; never a bad sample) is reported unhealthy and replaced."""
        if self.batches.fatal is not None:
            raise RuntimeError(f"the reward model failed: {self.batches.fatal}")


@dataclass
class RayServeConfig:
    """Arguments of the Serve application (``args:`` of a Serve config file).

    Attributes:
        model: checkpoint (hub id or directory).
        num_gpus: GPUs per replica (WorldPM-72B bf16: 2 at the very least, 4 comfortable).
        num_cpus: CPUs per replica.
        replicas: number of replicas (ignored when ``autoscaling`` is set).
        autoscaling: Serve's ``autoscaling_config`` (min_replicas, max_replicas,
            target_ongoing_requests, ...), or None for a fixed replica count.
        max_ongoing_requests: most requests a replica holds at once (Serve's backpressure).
        model_kwargs: ``RewardModel.from_pretrained`` options (ModelConfig fields).
        shaping: ``ShapingConfig`` fields.
        server: ``ServerConfig`` fields (token, chat_format, name, ...).
        max_batch_size: most samples per ``@serve.batch`` call.
        batch_wait_timeout_s: how long a batch waits to fill, in seconds.
        health_check_period_s: seconds between Serve's replica health checks.
    """

    model: str
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int = 4096
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    shaping: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int = 256
    batch_wait_timeout_s: float = 0.005
    health_check_period_s: float = 10.0


def build_app(args: Mapping[str, Any] | str) -> Any:
    """The Serve application, from one dict of :class:`RayServeConfig` fields, as Serve's
    config files and RayService pass it (``import_path: ...ray_serve:build_app``; Serve
    requires a builder with exactly one parameter), or a checkpoint alone:
    ``build_app({"model": ..., "num_gpus": 4})``, ``build_app("path")``."""
    values: dict[str, Any] = dict(args) if isinstance(args, Mapping) else {"model": args}
    known = {f.name for f in dataclasses.fields(RayServeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown Ray Serve app argument(s) {unknown}; known: {sorted(known)}")
    if "model" not in values:
        raise ConfigError("the Ray Serve app needs 'model' (a checkpoint id or directory)")
    cfg = RayServeConfig(**values)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "health_check_period_s": cfg.health_check_period_s,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.replicas
    return WorldPMDeployment.options(**options).bind(  # type: ignore[attr-defined]
        cfg.model, cfg.model_kwargs, cfg.shaping, cfg.server, cfg.max_batch_size, cfg.batch_wait_timeout_s
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``worldpm-reward-ray``: deploy on an existing Ray cluster (``ray start`` first)."""
    p = argparse.ArgumentParser(
        prog="worldpm-reward-ray", description="Deploy WorldPM as a Ray Serve reward app."
    )
    p.add_argument("--model", required=True)
    p.add_argument("--address", default="auto", help="Ray cluster address ('auto': the local cluster)")
    p.add_argument("--name", default="worldpm", help="Serve application name (WORLDPM_REWARD_RAY_APP)")
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="Serve HTTP proxy interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--model-kwargs",
        default="{}",
        help='JSON for RewardModel.from_pretrained, e.g. \'{"device_map": "auto"}\'',
    )
    p.add_argument(
        "--shaping", default="{}", help='JSON for ShapingConfig, e.g. \'{"normalize": "running"}\''
    )
    p.add_argument("--chat-format", default="auto")
    args = p.parse_args(argv)
    ray = require_extra("ray", "ray")

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(
        {
            "model": args.model,
            "num_gpus": args.num_gpus,
            "num_cpus": args.num_cpus,
            "replicas": args.replicas,
            "model_kwargs": json.loads(args.model_kwargs),
            "shaping": json.loads(args.shaping),
            "server": {
                "chat_format": args.chat_format,
                "name": args.name,
                "token": os.environ.get("WORLDPM_REWARD_TOKEN"),
            },
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_ms / 1000,
        }
    )
    serve.run(app, name=args.name, route_prefix=args.route_prefix, blocking=False)
    print(
        f"deployed '{args.name}' at http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/get_reward"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
