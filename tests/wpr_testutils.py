"""Shared helpers for the test suite: real data from ../shared/data and an independent reference.

(The data readers live in :mod:`worldpm_reward.testing.data`, shared with the benchmarks.)

The reference scorer here is written from the model card and REFERENCE.md only, without
importing worldpm_reward's formatting, loading or modeling code: transformers' plain
Qwen2Model, the head applied by hand from the safetensors tensors, ChatML rendered by
string concatenation, one conversation at a time, no padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from worldpm_reward.testing.data import real_conversations, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = shared_data_dir()
ENDOFTEXT_ID = 151643

__all__ = ["DATA", "ROOT", "ReferenceWorldPM", "real_conversations", "render_chatml_by_hand"]


def render_chatml_by_hand(messages: list[dict[str, str]]) -> str:
    """WorldPM's training format, from the model card: empty system kept, ChatML turns."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}, *messages]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


class ReferenceWorldPM:
    """Model-card scoring of a WorldPM-layout directory, one conversation at a time."""

    def __init__(self, path: str | Path) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg = {k: v for k, v in cfg.items() if k not in ("auto_map", "architectures", "model_type")}
        self.backbone = Qwen2Model(Qwen2Config(**cfg)).eval()
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        self.backbone.load_state_dict(
            {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        )
        self.w0, self.b0 = weights["score.0.weight"], weights["score.0.bias"]
        self.w2, self.b2 = weights["score.2.weight"], weights["score.2.bias"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.encode(render_chatml_by_hand(messages), add_special_tokens=False)
        return ids if ids and ids[-1] == ENDOFTEXT_ID else [*ids, ENDOFTEXT_ID]

    @torch.no_grad()
    def score(self, messages: list[dict[str, str]]) -> float:
        ids = torch.tensor([self.ids(messages)])
        hidden = self.backbone(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        h = torch.relu(hidden @ self.w0.T + self.b0)
        return float((h @ self.w2.T + self.b2)[0])
