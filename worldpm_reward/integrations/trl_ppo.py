"""TRL PPO adapter: WorldPM as the ``reward_model`` of ``trl.experimental.ppo.PPOTrainer``
(trl <= 1.12.0; PPO was removed from TRL in 1.13).

    from worldpm_reward.integrations.trl_ppo import WorldPMPPORewardModel
    trainer = PPOTrainer(..., reward_model=WorldPMPPORewardModel(policy_tokenizer, "Qwen/WorldPM-72B"))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from worldpm_reward.errors import SampleError
from worldpm_reward.integrations.trl import WorldPMReward
from worldpm_reward.policy_text import parse_rendered
from worldpm_reward.samples import Scorer
from worldpm_reward.shaping import ShapingConfig

__all__ = ["WorldPMPPORewardModel"]


class _DecodeAndScore(nn.Module):
    """The 'backbone' TRL's PPO get_reward calls: decodes the POLICY's token ids, rebuilds the
    conversation and returns the reward broadcast over every position as a (B, T, 1) 'hidden state'."""

    def __init__(self, score_texts: Callable[[list[str]], list[float]], tokenizer: Any) -> None:
        super().__init__()
        self._score_texts = score_texts
        self._tokenizer = tokenizer

    def forward(self, input_ids: Any, attention_mask: Any = None, **_: Any) -> Any:
        mask = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        texts = [
            self._tokenizer.decode(row[m].tolist(), skip_special_tokens=False)
            for row, m in zip(input_ids, mask)
        ]
        rewards = torch.tensor(self._score_texts(texts), dtype=torch.float32, device=input_ids.device)
        hidden = rewards[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1).contiguous()
        return _Output(hidden)


class _Output:
    def __init__(self, hidden: Any) -> None:
        self.hidden_states = (hidden,)
        self.last_hidden_state = hidden


class WorldPMPPORewardModel(nn.Module):
    """WorldPM as the ``reward_model`` of ``trl.experimental.ppo.PPOTrainer`` (trl <= 1.12.0).

    TRL's PPO ``get_reward`` hands the reward model the POLICY's token ids and reads
    ``model.score(getattr(model, model.base_model_prefix)(...).hidden_states[-1])`` at the
    last response token. This module decodes each sequence with the policy's tokenizer
    (special tokens kept), parses the policy's chat markup back into messages
    (:mod:`worldpm_reward.policy_text`), scores the conversation in WorldPM's own format,
    and returns the (shaped) reward at every position, so ``get_reward`` reads it wherever
    it looks.

    Limits: the policy must use a chat template with recognisable markup (ChatML, Llama 3,
    Mistral, Gemma, Phi-3: PPO hands over no prompt/response boundary, so plain-text
    prompts cannot be split); there are no gradients (PPO never trains the reward model);
    a sequence that cannot be scored raises, or gets ``missing_reward`` if you set one.

    Args:
        policy_tokenizer: the policy's tokenizer (PPOTrainer's ``processing_class``).
        model / url / scorer / shaping / model_kwargs / client_kwargs: as for WorldPMReward.
        chat_format: the policy's chat format, or "auto".
        missing_reward: reward for an unscorable sequence; None (default) raises instead.
    """

    base_model_prefix = "backbone"

    def __init__(
        self,
        policy_tokenizer: Any,
        model: str | os.PathLike[str] | None = None,
        *,
        url: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        shaping: ShapingConfig | Mapping[str, Any] | None = None,
        chat_format: str = "auto",
        missing_reward: float | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.reward = WorldPMReward(
            model,
            url=url,
            scorer=scorer,
            shaping=shaping,
            model_kwargs=model_kwargs,
            client_kwargs=client_kwargs,
        )
        self.chat_format = chat_format
        self.missing_reward = missing_reward
        self.backbone = _DecodeAndScore(self.score_texts, policy_tokenizer)
        self.score = torch.nn.Identity()
        self.last_conversations: list[Any] = []
        self.last_rewards: list[float] = []

    def score_texts(self, texts: list[str]) -> list[float]:
        """Rewards for policy-rendered texts (prompt + response, chat markup included)."""
        samples: list[Any] = []
        for i, text in enumerate(texts):
            try:
                samples.append({"messages": parse_rendered(text, None, self.chat_format, index=i).messages})
            except SampleError as exc:
                samples.append({"messages": [], "_error": str(exc)})
        batch = self.reward._reward_fn()(samples)
        out: list[float] = []
        for i, value in enumerate(batch.rewards):
            if value is None:
                if self.missing_reward is None:
                    reason = samples[i].get("_error") or batch.results[i].error
                    raise SampleError(
                        f"PPO reward: sequence {i} cannot be scored ({reason}); decoded text: {texts[i][:300]!r}"
                    )
                value = self.missing_reward
            out.append(float(value))
        self.last_conversations = [s["messages"] for s in samples]
        self.last_rewards = out
        return out
