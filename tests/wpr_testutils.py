"""Shared helpers for the test suite: real data from ../shared/data and an independent reference.

The reference scorer here is written from the model card and REFERENCE.md only, without
importing worldpm_reward's formatting, loading or modeling code: transformers' plain
Qwen2Model, the head applied by hand from the safetensors tensors, ChatML rendered by
string concatenation, one conversation at a time, no padding.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WORLDPM_SHARED_DATA", ROOT.parent / "shared" / "data"))
ENDOFTEXT_ID = 151643


def _hh_transcript(text: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages, or None if malformed."""
    msgs: list[dict[str, str]] = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        parts = chunk.split("\n\nAssistant: ")
        msgs.append({"role": "user", "content": parts[0].strip()})
        msgs.extend({"role": "assistant", "content": p.strip()} for p in parts[1:])
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or any(not m["content"] for m in msgs):
        return None
    if any(a["role"] == b["role"] for a, b in itertools.pairwise(msgs)):
        return None
    return msgs


def real_conversations(n: int = 240) -> list[list[dict[str, str]]]:
    """Real conversations (multi-turn hh-rlhf, LLMBar, PandaLM, HHH), deterministic order."""
    convs: list[list[dict[str, str]]] = []
    with gzip.open(DATA / "preferences" / "hh_rlhf_harmless_base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for key in ("chosen", "rejected"):
                msgs = _hh_transcript(rec[key])
                if msgs:
                    convs.append(msgs)
            if len(convs) >= n * 2 // 3:
                break
    for rec in json.loads((DATA / "preferences" / "llmbar" / "LLMBar_Natural.json").read_text())[: n // 8]:
        for key in ("output_1", "output_2"):
            if rec[key].strip():
                convs.append(
                    [{"role": "user", "content": rec["input"]}, {"role": "assistant", "content": rec[key]}]
                )
    for rec in json.loads((DATA / "preferences" / "pandalm" / "pandalm_testset-v1.json").read_text())[
        : n // 8
    ]:
        prompt = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        for key in ("response1", "response2"):
            if rec[key].strip():
                convs.append(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec[key]}]
                )
    with open(DATA / "preferences" / "hhh_alignment" / "hhh_alignment_pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            convs.append(
                [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["chosen"]}]
            )
    unique = list({json.dumps(c, sort_keys=True): c for c in convs}.values())  # the sets repeat some replies
    return unique[:n]


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
