"""The one last-token pooling seam: backbone -> hidden state at each row's last real token -> head.

Every reward model this package serves (WorldPM, POLAR, decoder sequence classifiers)
scores a sequence by the head's value at its LAST real token. The position is taken from
the attention mask alone, never from token ids: Qwen pads with ``<|endoftext|>``, which is
also WorldPM's scored token, so "last non-pad token" logic would score the wrong position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, from the mask alone.

    attention_mask: (B, T) with 1 for real tokens. Works for right and left padding.
    Returns (B,) int64.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=-1)


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H) -> (B, H): each row's hidden state at its last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)]


def head_device(head: nn.Module) -> torch.device:
    """Where the head's weights live (the last GPU under device_map sharding)."""
    return next(head.parameters()).device


def score_last_token(
    backbone: Any, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw scores (B,) in the head's dtype: ``head(backbone(ids).last_hidden_state[last real token])``.

    ``backbone`` is a transformers base model (``Qwen2Model``, ``LlamaModel``, ...) called
    with ``use_cache=False``; ``head`` maps (B, H) to (B, 1).
    """
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    pooled = pool_last(hidden, attention_mask)
    return head(pooled.to(head_device(head))).squeeze(-1)
