"""What a model family is: detection, loading, input encoding, scoring, known answers.

A family (WorldPM, POLAR, generic sequence classifiers) is one module in this package that
defines one :class:`RewardFamily` instance. :mod:`worldpm_reward.families` keeps the
registry; the scorer asks the family for everything model-specific, so adding a family is
one new module and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from worldpm_reward.checkpoints import LoadRequest
from worldpm_reward.samples import Conversation

if TYPE_CHECKING:
    from worldpm_reward.config import ModelConfig
    from worldpm_reward.encoder import Encoder

#: (input_ids (B, T), attention_mask (B, T)) -> raw scores (B,), read at each row's last real token.
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KnownAnswer:
    """A score published with a model (for ``worldpm-reward selftest``)."""

    label: str
    conversation: Conversation
    score: float
    reference: str | None = None  # for reference-based models (POLAR)
    tolerance: float | None = None  # when the published value is approximate

    @property
    def sample(self) -> dict[str, object]:
        out: dict[str, object] = {"messages": self.conversation}
        if self.reference is not None:
            out["reference"] = self.reference
        return out


class RewardFamily:
    """One family of reward-model checkpoints. Subclasses set the class attributes and
    implement :meth:`load` and :meth:`encoder`."""

    #: Registry key and ``ModelConfig.family`` value.
    name: str = ""
    #: config.json ``architectures`` entries that select this family under family="auto".
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Published scores, keyed by the checkpoint's released name (the end of a hub id or path).
    known_answers: ClassVar[dict[str, list[KnownAnswer]]] = {}
    #: Two samples (better, worse) any checkpoint of this family should order correctly.
    sanity_pair: ClassVar[tuple[Mapping[str, Any], Mapping[str, Any]]] = ({}, {})

    def load(self, request: LoadRequest) -> nn.Module:
        """Build the model from the checkpoint with strict weight checks, placed as requested."""
        raise NotImplementedError

    def encoder(self, tokenizer: Any, hf_config: Any, config: ModelConfig) -> Encoder:
        """The input encoder that turns samples into this family's exact token ids."""
        raise NotImplementedError

    def model_config(self, config_dict: dict[str, Any]) -> Any:
        """The transformers config the encoder reads (max positions, special token ids)."""
        raise NotImplementedError

    def check_weights(
        self, shapes: Mapping[str, tuple[int, ...] | None], config_dict: dict[str, Any], where: str
    ) -> None:
        """Refuse (CheckpointError) a checkpoint whose tensor names/shapes are not this family's
        layout, from names and shapes alone: runs before an external engine sees the checkpoint."""
        raise NotImplementedError

    def vllm_config(self, config_dict: dict[str, Any]) -> dict[str, Any] | None:
        """The config.json vLLM should read to build this family's model natively, with no
        remote code; None when the vLLM engine does not serve this family."""
        return None

    def forward_fn(self, model: nn.Module) -> ForwardFn:
        """How to get raw scores from the loaded model (default: its forward returns them)."""
        return model.forward

    def skeleton(self, config_dict: dict[str, Any]) -> nn.Module | None:
        """The reward model's module for ``config_dict`` (built under ``torch.device("meta")``
        by the sharded engine), when its parameter names ARE the checkpoint's tensor names
        and its forward returns raw scores (B,): what :mod:`worldpm_reward.engines.sharded`
        loads slice by slice. None when loading converts weights (POLAR's fused wqkv)."""
        return None

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(decoder backbone, head) when the model scores through the last-token seam, so a
        shared prefix can run once through the KV cache; None when it cannot (encoders)."""
        return None

    def known_answers_for(self, name_or_path: str) -> list[KnownAnswer]:
        base = str(name_or_path).rstrip("/").split("/")[-1]
        return list(self.known_answers.get(base, []))
