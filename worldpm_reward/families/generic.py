"""Generic reward models: any single-output ``*ForSequenceClassification`` checkpoint.

Loaded through transformers' own classes (remote code only with ``trust_remote_code``) and
fed the checkpoint's own chat template as is. Decoder classifiers (``Llama``/``Qwen2``/...
``ForSequenceClassification``: a backbone plus ``score = Linear(h, 1)``) are run through the
shared last-token seam so pooling uses the attention mask, not the pad id; other models
(encoders) use their own pooling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worldpm_reward.checkpoints import (
    LoadRequest,
    check_loading_info,
    check_weight_names,
    checkpoint_tensors,
    skeleton_shapes,
)
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import ChatTemplateEncoder, Encoder
from worldpm_reward.errors import CheckpointError
from worldpm_reward.families.base import ForwardFn, RewardFamily
from worldpm_reward.families.worldpm import SLEEP_BAD, SLEEP_GOOD
from worldpm_reward.pooling import score_last_token


def _conversation(reply: str) -> dict[str, Any]:
    return {"prompt": "Tips for better sleep?", "response": reply}


def decoder_only(hf_config: Any) -> bool:
    """Whether the config is a decoder-only language model's (Llama, Qwen2, Mistral, GPT-2, ...):
    one transformers has a causal LM class for, and no masked-LM class or encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(hf_config, "model_type", None)
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(hf_config, "is_encoder_decoder", False)
    )


class GenericFamily(RewardFamily):
    name = "generic"
    sanity_pair = (_conversation(SLEEP_GOOD), _conversation(SLEEP_BAD))

    def load(self, request: LoadRequest) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        where, cfg = request.where, request.config_dict
        archs = cfg.get("architectures") or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        if "PolarRewardModel" in archs:
            raise CheckpointError(
                f"{where} was written by save_pretrained of a POLAR model loaded by worldpm-reward: "
                "its weights are in the Llama layout that worldpm-reward maps InternLM2 onto, not "
                "POLAR's own. Load the original POLAR checkpoint (InternLM2ForRewardModel) instead."
            )
        if not is_classifier and "id2label" not in cfg and "num_labels" not in cfg:
            raise CheckpointError(
                f"{where} (architectures {archs}) is not a sequence-classification reward model: its config "
                "has no id2label/num_labels, so a classification head would be created at random. "
                "WorldPM checkpoints need family='worldpm' (or 'auto')."
            )
        remote = request.trust_remote_code
        config = AutoConfig.from_pretrained(
            request.name_or_path, trust_remote_code=remote, **request.hub_kwargs
        )
        if getattr(config, "num_labels", 1) != 1:
            raise CheckpointError(
                f"{where} is a classifier with num_labels={config.num_labels}; a reward model has one output. "
                "Pass a single-output reward model."
            )
        found = checkpoint_tensors(request.name_or_path, **request.hub_kwargs)
        if found:
            expected = skeleton_shapes(
                lambda: AutoModelForSequenceClassification.from_config(config, trust_remote_code=remote)
            )
            check_weight_names(found, expected, where)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            request.name_or_path, config=config, trust_remote_code=remote, **request.from_pretrained_kwargs()
        )
        check_loading_info(info, where)
        return model

    def encoder(self, tokenizer: Any, hf_config: Any, config: ModelConfig) -> Encoder:
        pad = getattr(hf_config, "pad_token_id", None)
        return ChatTemplateEncoder(
            tokenizer,
            max_length=int(config.max_length or getattr(hf_config, "max_position_embeddings", None) or 4096),
            overflow=config.overflow,
            chat_template=config.chat_template,
            special_tokens_in_content=config.special_tokens_in_content,
            tool_turns="template",  # a classifier's own chat template decides how tools read
            # as the model's own class reads a decoder classifier: at the last non-pad token
            scored_before=int(pad) if pad is not None and decoder_only(hf_config) else None,
        )

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """Decoder classifiers (``*ForSequenceClassification`` with ``score = Linear(h, 1)``)."""
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        head = getattr(model, "score", None)
        if isinstance(head, nn.Linear) and head.out_features == 1 and isinstance(backbone, nn.Module):
            return backbone, head
        return None

    def forward_fn(self, model: nn.Module) -> ForwardFn:
        parts = self.parts(model)
        if parts is not None:
            backbone, head = parts

            # Decoder reward models: backbone + head through the shared seam (mask-based pooling).
            def decoder_rm(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return score_last_token(backbone, head, ids, mask)

            return decoder_rm

        def own_pooling(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=mask).logits[:, 0]

        return own_pooling


FAMILY = GenericFamily()
