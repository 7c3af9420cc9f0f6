"""Toy reward models trained in seconds to prefer replies with more numbers (for recipe smoke
runs: a policy trained against them must visibly raise its reward).

:func:`write_digit_preferring_worldpm` / :func:`write_digit_preferring_polar` write real
WorldPM / POLAR checkpoint layouts whose weights were trained on synthetic preference pairs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from worldpm_reward.testing.checkpoints import _mark_worldpm_config, write_tiny_polar, write_tiny_worldpm

_WORDS = [
    "the",
    "a",
    "answer",
    "is",
    "so",
    "then",
    "we",
    "get",
    "total",
    "each",
    "one",
    "two",
    "more",
    "less",
    "apples",
    "cookies",
    "hours",
    "miles",
    "dollars",
    "per",
    "day",
    "week",
    "she",
    "he",
    "they",
    "has",
    "had",
    "buys",
    "sells",
    "makes",
    "left",
    "over",
    "first",
    "next",
    "finally",
    "because",
    "therefore",
    "equals",
    "plus",
    "minus",
    "times",
]

_NOISE = (
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'\"()-_/\n\u00e9\u00fc\u00df\u4e2d\u6587"
)


def _synthetic_pair(rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): the same reply with more vs fewer numbers. Replies are words or
    character noise (what an untrained tiny policy emits), so the preference is learnable
    from any starting point."""
    if rng.random() < 0.5:
        parts = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
    else:
        parts = [
            "".join(rng.choice(_NOISE) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 10))
        ]
    few = rng.randint(0, 2)
    many = few + rng.randint(1, 4)
    numbers = [str(rng.randint(0, 999)) for _ in range(many)]
    slots = [rng.randrange(len(parts) + 1) for _ in range(many)]

    def build(k: int) -> str:
        out = list(parts)
        for slot, num in sorted(zip(slots[:k], numbers[:k]), reverse=True):
            out.insert(slot, num)
        return " ".join(out)

    return build(many), build(few)


def _train_number_preference(rm: object, steps: int, seed: int, with_reference: bool) -> None:
    """Bradley-Terry steps on synthetic (more numbers, fewer numbers) pairs, in place."""
    from worldpm_reward.samples import parse_sample

    model = rm.model  # type: ignore[attr-defined]
    model.requires_grad_(True).train()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompts = [
        "How many apples are left?",
        "What is the total cost?",
        "Solve the problem.",
        "How far did she go?",
    ]
    for _ in range(steps):
        batch = []
        for _ in range(8):
            prompt = rng.choice(prompts)
            chosen, rejected = _synthetic_pair(rng)
            ref = {"reference": _synthetic_pair(rng)[0]} if with_reference else {}
            batch += [
                {"prompt": prompt, "response": chosen, **ref},
                {"prompt": prompt, "response": rejected, **ref},
            ]
        ids = [rm.encoder.encode(parse_sample(s)).input_ids for s in batch]  # type: ignore[attr-defined]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), rm.engine.pad_token_id)  # type: ignore[attr-defined]
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        scores = model(input_ids, mask)
        loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def write_digit_preferring_worldpm(path: str | os.PathLike[str], *, seed: int = 0, steps: int = 200) -> Path:
    """A tiny WorldPM-layout checkpoint TRAINED to prefer replies with more numbers in them.

    Random tiny weights give rewards no policy can learn from; smoke runs of RL recipes need
    a fixed reward model with a learnable preference. This trains the tiny model for
    ``steps`` Bradley-Terry steps on synthetic pairs (the same reply with more vs fewer
    numbers; a few seconds on CPU), then saves it in the real WorldPM layout. Deterministic
    per seed.
    """
    from worldpm_reward.scoring import RewardModel

    out = write_tiny_worldpm(path, seed=seed)
    rm = RewardModel.from_pretrained(out, device="cpu")
    _train_number_preference(rm, steps, seed, with_reference=False)
    rm.model.save_pretrained(out, safe_serialization=True)
    _mark_worldpm_config(out)
    return out


def write_digit_preferring_polar(path: str | os.PathLike[str], *, seed: int = 0, steps: int = 200) -> Path:
    """The same for POLAR: a tiny InternLM2ForRewardModel-layout checkpoint trained to prefer
    outputs with more numbers (whatever the reference), saved back in POLAR's layout."""
    from safetensors.torch import save_file

    from worldpm_reward.families.polar import to_internlm2_state_dict
    from worldpm_reward.scoring import RewardModel

    out = write_tiny_polar(path, seed=seed)
    rm = RewardModel.from_pretrained(out, device="cpu")
    _train_number_preference(rm, steps, seed, with_reference=True)
    cfg = json.loads((out / "config.json").read_text())
    weights = {k: v.contiguous() for k, v in to_internlm2_state_dict(rm.model, cfg).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
