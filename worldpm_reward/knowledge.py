"""Known answers published with the models, for ``worldpm-reward selftest``.

WorldPM-72B (model card, bf16, one conversation at a time): the two replies below to
"Tips for better sleep?" score 0.6298332214355469 and -1.6425328254699707.
POLAR-7B (model card): prompt "What is the capital of China?", reference "Beijing.":
output "Beijing." about -0.57, output "Shanghai." about -11.03.
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
    reference: str | None = None  # for reference-based models (POLAR)
    tolerance: float | None = None  # when the published value is approximate

    @property
    def sample(self) -> dict[str, object]:
        out: dict[str, object] = {"messages": self.conversation}
        if self.reference is not None:
            out["reference"] = self.reference
        return out


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


def _capital(reply: str) -> Conversation:
    return [
        {"role": "user", "content": "What is the capital of China?"},
        {"role": "assistant", "content": reply},
    ]


# POLAR-7B (model card, via transformers): "about -0.57" and "about -11.03".
KNOWN_ANSWERS["POLAR-7B"] = [
    KnownAnswer(
        "capital of China, right answer", _capital("Beijing."), -0.57, reference="Beijing.", tolerance=0.3
    ),
    KnownAnswer(
        "capital of China, wrong answer", _capital("Shanghai."), -11.03, reference="Beijing.", tolerance=0.5
    ),
]

#: Conversations any preference model should tell apart (used when no known answer exists).
SANITY_PAIR = (_sleep(SLEEP_GOOD), _sleep(SLEEP_BAD))
#: The same for reference-based models: (right, wrong) answers and their reference.
REFERENCE_SANITY_PAIR = (_capital("Beijing."), _capital("Shanghai."), "Beijing.")


def known_answers_for(name_or_path: str) -> list[KnownAnswer]:
    base = name_or_path.rstrip("/").split("/")[-1]
    return list(KNOWN_ANSWERS.get(base, []))
