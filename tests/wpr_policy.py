"""Tiny policies for trainer and protocol tests: their OWN vocabulary (byte-level BPE trained
on real GSM8K questions) and chat template, never WorldPM's, so every conversation must be
re-rendered in WorldPM's ChatML to be scored correctly. Thin wrappers over
worldpm_reward.testing; the default format is Phi-3 style (<|user|> ... <|end|>)."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from wpr_testutils import DATA

from worldpm_reward.testing import CHATML_POLICY_TEMPLATE as CHATML_TEMPLATE
from worldpm_reward.testing import LLAMA3_POLICY_TEMPLATE as LLAMA3_TEMPLATE
from worldpm_reward.testing import PHI3_POLICY_TEMPLATE as PHI3_TEMPLATE
from worldpm_reward.testing import tiny_policy as _tiny_policy
from worldpm_reward.testing import tiny_policy_tokenizer as _tiny_policy_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "PHI3_TEMPLATE",
    "gsm8k_questions",
    "tiny_policy",
    "tiny_policy_tokenizer",
]


@functools.lru_cache(maxsize=4)
def gsm8k_questions(n: int) -> list[str]:
    with gzip.open(DATA / "prompts" / "gsm8k_train.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


def tiny_policy_tokenizer(vocab_size: int = 600, fmt: str = "phi3"):
    return _tiny_policy_tokenizer(gsm8k_questions(500), vocab_size=vocab_size, chat_format=fmt)


def tiny_policy(path: Path | None = None, seed: int = 0, fmt: str = "phi3"):
    """(model, tokenizer): a 2-layer Llama with the tokenizer above; saved to path if given."""
    return _tiny_policy(gsm8k_questions(500), seed=seed, chat_format=fmt, path=path)
