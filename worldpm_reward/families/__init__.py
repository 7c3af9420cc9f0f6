"""Model families and the one loading entry point.

One module per family, each defining a :class:`~worldpm_reward.families.base.RewardFamily`:

  * ``worldpm`` (:mod:`.worldpm`): ``Qwen2ForRewardModel`` (WorldPM-72B and fine-tunes,
    Qwen2.5-Math-RM layout), built natively on transformers' ``Qwen2Model``;
  * ``polar`` (:mod:`.polar`): ``InternLM2ForRewardModel`` (POLAR), mapped onto ``LlamaModel``;
  * ``generic`` (:mod:`.generic`): any single-output ``*ForSequenceClassification``.

:func:`load` reads config.json, picks the family (``architectures``, unless one is named),
resolves dtype and placement once, lets the family build the model with its strict weight
checks, and loads the tokenizer. Adding a family: a new module and a line in ``FAMILIES``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worldpm_reward.checkpoints import LoadRequest, default_device, read_config_dict, resolve_dtype
from worldpm_reward.config import ModelConfig
from worldpm_reward.errors import ConfigError
from worldpm_reward.families import generic, polar, worldpm
from worldpm_reward.families.base import ForwardFn, KnownAnswer, RewardFamily

logger = logging.getLogger(__name__)

#: Every family by name. ``generic`` is the fallback of family="auto".
FAMILIES: dict[str, RewardFamily] = {f.name: f for f in (worldpm.FAMILY, polar.FAMILY, generic.FAMILY)}


def detect_family(config_dict: dict[str, Any]) -> str:
    """The family whose architectures appear in config.json, else "generic"."""
    archs = config_dict.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            return family.name
    return generic.FAMILY.name


def get_family(name: str) -> RewardFamily:
    if name not in FAMILIES:
        raise ConfigError(f"family: expected 'auto' or one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def known_answers_for(name_or_path: str) -> list[KnownAnswer]:
    """Published scores for a checkpoint, matched by its released name (any family)."""
    return [a for family in FAMILIES.values() for a in family.known_answers_for(name_or_path)]


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Any
    family: RewardFamily
    config: Any  # the model's transformers config


def load(name_or_path: str | os.PathLike[str], config: ModelConfig | None = None) -> LoadedCheckpoint:
    """Load model + tokenizer of a reward-model checkpoint, with the family's weight checks."""
    from transformers import AutoTokenizer

    cfg = config or ModelConfig()
    hub_kwargs = cfg.hub_kwargs
    config_dict = read_config_dict(name_or_path, **hub_kwargs)
    family = get_family(detect_family(config_dict) if cfg.family == "auto" else cfg.family)
    device = cfg.device
    if cfg.device_map is None and device is None:
        device = default_device()
    placement = device if cfg.device_map is None else ("cuda" if torch.cuda.is_available() else "cpu")
    request = LoadRequest(
        name_or_path=str(name_or_path),
        config_dict=config_dict,
        dtype=resolve_dtype(cfg.dtype, placement),
        device=device if cfg.device_map is None else None,
        device_map=cfg.device_map,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        hub_kwargs=hub_kwargs,
    )
    model = family.load(request)
    if cfg.device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), trust_remote_code=cfg.trust_remote_code, **hub_kwargs
    )
    logger.info("loaded %s as family=%s dtype=%s", request.where, family.name, request.dtype)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, family=family, config=model.config)


__all__ = [
    "FAMILIES",
    "ForwardFn",
    "KnownAnswer",
    "LoadedCheckpoint",
    "RewardFamily",
    "detect_family",
    "get_family",
    "known_answers_for",
    "load",
]
