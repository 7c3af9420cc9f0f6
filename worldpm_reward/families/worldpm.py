"""WorldPM (Qwen/WorldPM-72B and its fine-tunes): architecture, loading, input format, known answers.

``Qwen2ForRewardModel``: a Qwen2 backbone whose final hidden state at the LAST token goes
through ``score = Sequential(Linear(h, h), ReLU, Linear(h, 1))``. The output is a raw,
unbounded Bradley-Terry logit per sequence (no sigmoid). Weight names are ``model.*`` for
the backbone and ``score.0.*`` / ``score.2.*`` for the head, so the real checkpoints load as
they are, on transformers' own ``Qwen2Model``: the ``auto_map`` to remote code in the real
config is never followed.

Input (the model card's training format): the conversation rendered with the checkpoint's
ChatML template with an EMPTY system message always present, tokenized with
``add_special_tokens=False``, ending with ``<|endoftext|>`` exactly once (the scored token).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

from worldpm_reward.checkpoints import (
    LoadRequest,
    check_loading_info,
    check_weight_names,
    checkpoint_tensors,
    skeleton_shapes,
)
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import ChatTemplateEncoder, Encoder
from worldpm_reward.families.base import KnownAnswer, RewardFamily
from worldpm_reward.pooling import score_last_token
from worldpm_reward.samples import Conversation

logger = logging.getLogger(__name__)

ARCHITECTURES = ("Qwen2ForRewardModel",)
#: What ``save_pretrained`` of the loaded model writes (transformers names the saving class): a
#: WorldPM checkpoint in the same layout, detected as WorldPM too.
SAVED_ARCHITECTURES = ("WorldPMForRewardModel",)
FINAL_TOKEN = "<|endoftext|>"


class WorldPMForRewardModel(Qwen2PreTrainedModel):
    """Qwen2 backbone + WorldPM's two-layer head on the last real token.

    ``forward`` returns the raw scores, shape (B,), in the head's dtype.
    """

    config: Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = nn.Sequential(
            nn.Linear(hidden, hidden, bias=True), nn.ReLU(), nn.Linear(hidden, 1, bias=True)
        )
        self.post_init()

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return score_last_token(self.model, self.score, input_ids, attention_mask)


def worldpm_config(config_dict: dict[str, Any]) -> Qwen2Config:
    """A Qwen2Config from a WorldPM config.json; its auto_map and model_type never matter."""
    clean = {
        k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type", "transformers_version")
    }
    config = Qwen2Config(**clean)
    config.use_cache = False
    config.architectures = list(ARCHITECTURES)
    return config


def _single_linear_hint(found: dict[str, tuple[int, ...] | None], missing: set[str]) -> str | None:
    if "score.weight" in found and any(k.startswith("score.0.") for k in missing):
        return (
            "It has a single-Linear head ('score.weight', the stock AutoModelForSequenceClassification "
            "layout), but WorldPM's head is score.0 (Linear h->h) -> ReLU -> score.2 (Linear h->1). "
            "A single-Linear head would score garbage; if this really is a generic classifier reward "
            "model, load it with family='generic'."
        )
    return None


SLEEP_GOOD = (
    "Three key tips for better sleep:\n1. Set a consistent bedtime and wake-up schedule\n2. Avoid screens 1 hour "
    "before bed\n3. Keep your bedroom cool and dark\n\nStart with these habits and you should notice improvement "
    "within a week."
)
SLEEP_BAD = (
    "just try sleeping earlier or take some pills if u cant sleep lol. maybe watch tv until u get tired idk"
)


def _sleep(reply: str) -> Conversation:
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Tips for better sleep?"},
        {"role": "assistant", "content": reply},
    ]


class WorldPMFamily(RewardFamily):
    name = "worldpm"
    architectures = ARCHITECTURES + SAVED_ARCHITECTURES
    #: WorldPM-72B (model card, bf16, one conversation at a time).
    known_answers: ClassVar[dict[str, list[KnownAnswer]]] = {
        "WorldPM-72B": [
            KnownAnswer("sleep tips, helpful reply", _sleep(SLEEP_GOOD), 0.6298332214355469),
            KnownAnswer("sleep tips, careless reply", _sleep(SLEEP_BAD), -1.6425328254699707),
        ]
    }
    sanity_pair = ({"messages": _sleep(SLEEP_GOOD)}, {"messages": _sleep(SLEEP_BAD)})

    def model_config(self, config_dict: dict[str, Any]) -> Qwen2Config:
        return worldpm_config(config_dict)

    def check_weights(
        self, shapes: Mapping[str, tuple[int, ...] | None], config_dict: dict[str, Any], where: str
    ) -> None:
        config = worldpm_config(config_dict)
        expected = skeleton_shapes(lambda: WorldPMForRewardModel(config))
        check_weight_names(dict(shapes), expected, where, hint=_single_linear_hint)

    def vllm_config(self, config_dict: dict[str, Any]) -> dict[str, Any] | None:
        """vLLM's own ``Qwen2ForRewardModel`` has WorldPM's head; the auto_map is dropped."""
        out = {k: v for k, v in config_dict.items() if k != "auto_map"}
        out["architectures"] = list(ARCHITECTURES)
        return out

    def load(self, request: LoadRequest) -> nn.Module:
        config = worldpm_config(request.config_dict)
        expected = skeleton_shapes(lambda: WorldPMForRewardModel(config))
        found = checkpoint_tensors(request.name_or_path, **request.hub_kwargs)
        if found:
            check_weight_names(found, expected, request.where, hint=_single_linear_hint)
        else:
            logger.warning(
                "%s has no safetensors index; relying on the post-load weight check", request.where
            )
        loaded: Any = WorldPMForRewardModel.from_pretrained(
            request.name_or_path, config=config, **request.from_pretrained_kwargs()
        )
        model, info = loaded
        check_loading_info(info, request.where)
        return model

    def skeleton(self, config_dict: dict[str, Any]) -> nn.Module | None:
        return WorldPMForRewardModel(worldpm_config(config_dict))

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        return model.model, model.score  # type: ignore[return-value]

    def encoder(self, tokenizer: Any, hf_config: Any, config: ModelConfig) -> Encoder:
        return ChatTemplateEncoder(
            tokenizer,
            max_length=int(config.max_length or getattr(hf_config, "max_position_embeddings", None) or 4096),
            ensure_system=True,
            final_token=FINAL_TOKEN,
            overflow=config.overflow,
            chat_template=config.chat_template,
            special_tokens_in_content=config.special_tokens_in_content,
        )


FAMILY = WorldPMFamily()
