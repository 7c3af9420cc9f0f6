"""Engines: what runs a reward model's forward pass, peers behind one small protocol.

:class:`~worldpm_reward.scoring.RewardModel` is the engine-neutral front: checkpoint
checks, the family's input format, truncation, per-sample errors, the finite check and the
counters are the same whichever engine runs. It holds one engine (``rm.engine``), which
takes encoded ids and gives back scores (:class:`~worldpm_reward.engines.base.Engine`).
Engines are found by name in :data:`ENGINES` and imported on first use, so neither
``import worldpm_reward`` nor ``worldpm-reward --help`` imports torch or transformers.

  * ``transformers`` (:class:`.transformers.TransformersEngine`, the default): the model in
    this process, token-budgeted length-sorted batches (packed rows where the backbone
    allows), shared-prefix scoring of GRPO groups, out-of-memory batches retried in halves.
  * ``vllm`` (:class:`.vllm.VLLMEngine`): vLLM's pooling runner (tensor parallel, continuous
    batching, its kernels), in this process when vLLM imports here, else in its own
    virtualenv behind ``vllm serve`` (vLLM pins its own torch and transformers).
  * ``fsdp`` (:class:`.sharded.ShardedEngine`): ONE model sharded over the ranks of a
    torch.distributed job (FSDP2), each rank scoring its own samples in collective forward
    calls; its ``rank``, ``world_size``, ``memory()``, ``offload()`` and ``onload()`` are
    reached as ``rm.engine.<name>``.

Adding an engine: a module with a class that has ``load(name_or_path, config)`` and the
:class:`~worldpm_reward.engines.base.Engine` methods, a line in :data:`ENGINES`, and its
name in :data:`worldpm_reward.config.EngineName` (a test checks the two agree).
"""

from __future__ import annotations

import importlib
from typing import cast

from worldpm_reward.engines.base import BatchStats, Engine, EngineClass, LoadedEngine
from worldpm_reward.errors import ConfigError

__all__ = ["ENGINES", "BatchStats", "Engine", "EngineClass", "LoadedEngine", "engine_class"]

#: Every engine by ``ModelConfig.engine`` name: "module:class" of its engine class.
ENGINES: dict[str, str] = {
    "transformers": "worldpm_reward.engines.transformers:TransformersEngine",
    "vllm": "worldpm_reward.engines.vllm:VLLMEngine",
    "fsdp": "worldpm_reward.engines.sharded:ShardedEngine",
}


def engine_class(name: str) -> EngineClass:
    """The class of a registered engine (imports its module, and so torch, on first use)."""
    target = ENGINES.get(name)
    if target is None:
        raise ConfigError(f"engine: {name!r} is not registered; expected one of {sorted(ENGINES)}")
    module, _, attr = target.partition(":")
    return cast(EngineClass, getattr(importlib.import_module(module), attr))
