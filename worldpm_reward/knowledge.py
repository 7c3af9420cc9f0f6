"""Known answers published with the models, for ``worldpm-reward selftest``.

WorldPM-72B (model card, bf16, one conversation at a time): the two replies below to
"Tips for better sleep?" score 0.6298332214355469 and -1.6425328254699707.
"""

from __future__ import annotations

from dataclasses import dataclass

from worldpm_reward.samples import Conversation

SLEEP_GOOD = (
    "Three key tips for better sleep:\n1. Set a consistent bedtime and wake-up schedule\n2. Avoid screens 1 hour "
    "before bed\n3. Keep your bedroom cool and dark\n\nStart with these habits and you should notice improvement "
    "within a week."
)
SLEEP_BAD = (
    "just try sleeping earlier or take some pills if u cant sleep lol. maybe watch tv until u get tired idk"
)


@dataclass(frozen=True)
class KnownAnswer:
    label: str
    conversation: Conversation
    score: float


def _sleep(reply: str) -> Conversation:
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Tips for better sleep?"},
        {"role": "assistant", "content": reply},
    ]


#: Keyed by the checkpoint's name as released (matched against the end of a hub id or path).
KNOWN_ANSWERS: dict[str, list[KnownAnswer]] = {
    "WorldPM-72B": [
        KnownAnswer("sleep tips, helpful reply", _sleep(SLEEP_GOOD), 0.6298332214355469),
        KnownAnswer("sleep tips, careless reply", _sleep(SLEEP_BAD), -1.6425328254699707),
    ],
}

#: Conversations any preference model should tell apart (used when no known answer exists).
SANITY_PAIR = (_sleep(SLEEP_GOOD), _sleep(SLEEP_BAD))


def known_answers_for(name_or_path: str) -> list[KnownAnswer]:
    base = name_or_path.rstrip("/").split("/")[-1]
    return list(KNOWN_ANSWERS.get(base, []))
