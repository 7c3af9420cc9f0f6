"""WorldPM's reward-model architecture, natively on transformers' Qwen2Model (no remote code).

WorldPM (Qwen/WorldPM-72B and its fine-tunes) is ``Qwen2ForRewardModel``: a Qwen2
backbone whose final hidden state at the LAST token goes through
``score = Sequential(Linear(h, h), ReLU, Linear(h, 1))``. The output is a raw, unbounded
scalar per sequence (no sigmoid). Checkpoint weight names are ``model.*`` for the
backbone and ``score.0.*`` / ``score.2.*`` for the head, so this module loads the real
checkpoints as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, from the mask alone.

    attention_mask: (B, T) with 1 for real tokens. Works for right and left padding and
    never looks at token ids, so a pad id equal to ``<|endoftext|>`` cannot shift the
    scored position (the classic "last non-pad token" pitfall). Returns (B,) int64.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=-1)


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H) -> (B, H): each row's hidden state at its last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)]


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
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        pooled = pool_last(hidden, attention_mask)
        head_device = next(self.score.parameters()).device
        return self.score(pooled.to(head_device)).squeeze(-1)
