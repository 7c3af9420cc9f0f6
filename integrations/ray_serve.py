"""Ray Serve: WorldPM as a reward deployment on its own GPUs inside a Ray cluster.

    worldpm-reward-ray --model Qwen/WorldPM-72B --num-gpus 4 --model-kwargs '{"device_map": "auto"}' \\
        --address auto --host 0.0.0.0 --port 8000

The deployment serves the same HTTP endpoints as ``worldpm-reward serve`` (``/get_reward``
for OpenRLHF, ``/v1/score``, ``/health``, ``/metrics``) through Serve's HTTP proxy, and
handle methods for callers inside the cluster (OpenRLHF rollout actors through the
reward-function file with ``WORLDPM_REWARD_RAY_APP``)::

    handle = serve.get_app_handle("worldpm")
    handle.score.remote([{"prompt": "...", "response": "..."}]).result()     # like /v1/score
    handle.get_reward.remote(queries, prompts, labels).result()             # like /get_reward

Requests from every path are batched together by ``@serve.batch`` (one sample per batch
slot); the replica's scorer then packs them into token-budgeted micro-batches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from worldpm_reward.errors import require_extra
from worldpm_reward.samples import ScoreResult
from worldpm_reward.service import RequestError
from worldpm_reward.serving import ServerConfig, create_app
from worldpm_reward.shaping import ShapingConfig

serve = require_extra("ray.serve", "ray")
logger = logging.getLogger(__name__)

__all__ = ["WorldPMDeployment", "build_app", "main"]


@serve.deployment
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
        import httpx

        from worldpm_reward.scoring import RewardModel

        self.scorer = RewardModel.from_pretrained(model, **(model_kwargs or {}))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.app = create_app(
            self.scorer, ServerConfig(**(server or {})), ShapingConfig(**(shaping or {})), submit=self._submit
        )
        self.service = self.app.state.service
        self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica")

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005)
    async def _batched(self, samples: list[Any]) -> list[ScoreResult]:
        return await asyncio.to_thread(self.scorer.score_detailed, samples)

    async def _submit(self, samples: Sequence[Any]) -> list[ScoreResult]:
        return list(await asyncio.gather(*(self._batched(s) for s in samples)))

    async def __call__(self, request: Any) -> Any:
        """HTTP through Serve's proxy: handled by the same FastAPI app as the standalone server."""
        from starlette.responses import Response

        r = await self._http.request(
            request.method,
            request.url.path,
            content=await request.body(),
            headers=[
                (k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
            ],
            params=request.query_params,
        )
        skip = {"content-length", "transfer-encoding", "connection"}
        return Response(
            r.content, r.status_code, headers={k: v for k, v in r.headers.items() if k.lower() not in skip}
        )

    async def score(self, samples: list[Any]) -> dict[str, Any]:
        """Handle path of /v1/score: per-item results for a list of samples."""
        return await self.service.score(samples)

    async def get_reward(
        self, query: list[str], prompts: list[str] | None = None, labels: list[Any] | None = None
    ) -> dict[str, Any]:
        """Handle path of OpenRLHF's /get_reward; raises ValueError naming bad items."""
        try:
            return await self.service.get_reward(query, prompts, labels)
        except RequestError as exc:
            raise ValueError(f"HTTP {exc.status}: {json.dumps(exc.detail)}") from None


def build_app(
    model: str,
    *,
    num_gpus: float = 1.0,
    num_cpus: float = 1.0,
    replicas: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    shaping: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    max_batch_size: int = 256,
    batch_wait_timeout_s: float = 0.005,
) -> Any:
    """The Serve application: ``replicas`` copies, each on ``num_gpus`` GPUs."""
    options = {
        "num_replicas": replicas,
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
        "max_ongoing_requests": 4096,
    }
    return WorldPMDeployment.options(**options).bind(
        model, model_kwargs, shaping, server, max_batch_size, batch_wait_timeout_s
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
    import os

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(
        args.model,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        replicas=args.replicas,
        model_kwargs=json.loads(args.model_kwargs),
        shaping=json.loads(args.shaping),
        server={
            "chat_format": args.chat_format,
            "name": args.name,
            "token": os.environ.get("WORLDPM_REWARD_TOKEN"),
        },
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
    )
    serve.run(app, name=args.name, route_prefix=args.route_prefix, blocking=False)
    print(
        f"deployed '{args.name}' at http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/get_reward"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
