"""Recover conversations from text a POLICY's chat template rendered.

OpenRLHF sends the reward server ``query`` = prompt + response decoded by the policy's
tokenizer with special tokens kept, and ``prompts`` = the templated prompt; TRL's PPO
hands the reward model the policy's token ids. WorldPM must see the conversation in its
own format, so the policy's markup is parsed back into ``{"role", "content"}`` messages
here and re-rendered by the scorer.

Known formats: "chatml" (Qwen, SmolLM, ...: ``<|im_start|>role\\n...<|im_end|>``),
"llama3" (``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``), "mistral"
(``[INST] ... [/INST] ...</s>``), "gemma" (``<start_of_turn>role\\n...<end_of_turn>``),
"phi3" (``<|user|>\\n...<|end|>``) and "plain" (no markup: the prompt is one user turn,
the response is what follows it). "auto" picks by the markers present; text with no
known markers is "plain" and is counted as unknown by callers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from worldpm_reward.errors import ConfigError, SampleError
from worldpm_reward.samples import Conversation, Sample

FORMATS = ("auto", "chatml", "llama3", "mistral", "gemma", "phi3", "plain")

#: How the part of a query after its prompt is read: "as-written" parses the turns written
#: there (an environment's feedback turns, in OpenRLHF's agent mode, are turns); "one" takes
#: all of it as ONE assistant reply whose markup is text, so a policy that writes an
#: end-of-turn marker and a fake user turn cannot have the fake turn's reply scored instead.
REPLY_TURNS = ("as-written", "one")
#: Stands in for the reply while the prompt alone is parsed (reply_turns="one").
_REPLY_SLOT = "\u2063worldpm-reward-reply\u2063"

#: Tokens that end a turn or pad a sequence, stripped from the end of a decoded reply.
END_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "</s>",
    "<end_of_turn>",
    "<eos>",
    "<|end|>",
    "<pad>",
    "<|pad|>",
    "[PAD]",
)
#: System prompts that templates inject on their own (not the user's): dropped so that
#: WorldPM sees its training format (an empty system message).
DEFAULT_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",  # SmolLM2-Instruct
)
#: The header Llama 3.1's template puts at the start of every system message (before the
#: user's own system prompt, if any), after "Environment: ipython" when tools are on.
_LLAMA31_HEADER = re.compile(
    r"^(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n*"
)
#: Where each format's markup starts: the format of a text is the one whose markup comes
#: FIRST (a reply that quotes another format's markup must not switch the parser).
_MARKERS = (
    ("chatml", re.compile(r"<\|im_start\|>")),
    ("llama3", re.compile(r"<\|start_header_id\|>")),
    ("gemma", re.compile(r"<start_of_turn>")),
    ("mistral", re.compile(r"\[INST\]|\[SYSTEM_PROMPT\]")),
    ("phi3", re.compile(r"<\|(?:user|assistant|system)\|>")),
)


@dataclass(frozen=True)
class Parsed:
    messages: Conversation  # ends with the assistant reply
    format: str  # the format used ("plain" also when nothing was recognised)
    recognised: bool  # False when the text had no known markup


def detect_format(text: str) -> str:
    """The known format whose markup starts first in ``text``; "plain" when there is none."""
    found = [(m.start(), name) for name, pattern in _MARKERS if (m := pattern.search(text))]
    return min(found)[1] if found else "plain"


def strip_end_tokens(text: str) -> str:
    """Remove trailing end-of-turn / pad tokens (and the whitespace around them)."""
    changed = True
    while changed:
        changed = False
        stripped = text.rstrip()
        for tok in END_TOKENS:
            if stripped.endswith(tok):
                text, changed = stripped[: -len(tok)], True
    return text


def _turns(text: str, start: str, header_end: str, end: str) -> list[tuple[str, str, bool]]:
    """Split '<start>role<header_end>content<end>' turns; (role, content, closed)."""
    out = []
    for chunk in text.split(start)[1:]:
        role, sep, rest = chunk.partition(header_end)
        if not sep:
            raise ValueError(f"malformed turn header near {chunk[:40]!r}")
        content, closed, _ = rest.partition(end)
        out.append((role.strip(), content, bool(closed)))
    return out


def _chatml(text: str) -> list[tuple[str, str, bool]]:
    return _turns(text, "<|im_start|>", "\n", "<|im_end|>")


def _llama3(text: str) -> list[tuple[str, str, bool]]:
    return [
        (r, c.strip(), cl)
        for r, c, cl in _turns(text, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    ]


def _gemma(text: str) -> list[tuple[str, str, bool]]:
    return [
        ("assistant" if r == "model" else r, c.strip(), cl)
        for r, c, cl in _turns(text, "<start_of_turn>", "\n", "<end_of_turn>")
    ]


def _phi3(text: str) -> list[tuple[str, str, bool]]:
    parts = re.split(r"<\|(user|assistant|system)\|>", text)
    out = []
    for role, body in zip(parts[1::2], parts[2::2]):
        content, closed, _ = body.partition("<|end|>")
        out.append((role, content.strip(), bool(closed)))
    return out


def _mistral(text: str) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    # v7 templates (Mistral-Small-3 and later): the system prompt's own block, first in the text
    system = re.match(r"\s*(?:<s>)?\s*\[SYSTEM_PROMPT\](.*?)\[/SYSTEM_PROMPT\]", text, flags=re.S)
    if system is not None:
        out.append(("system", system.group(1).strip(), True))
        text = text[system.end() :]
    for m in re.finditer(r"\[INST\](.*?)\[/INST\](.*?)(?=\[INST\]|$)", text, flags=re.S):
        out.append(("user", m.group(1).strip(), True))
        reply, closed, _ = m.group(2).partition("</s>")
        out.append(("assistant", reply.strip(), bool(closed)))
    return out


_PARSERS: dict[str, Callable[[str], list[tuple[str, str, bool]]]] = {
    "chatml": _chatml,
    "llama3": _llama3,
    "gemma": _gemma,
    "phi3": _phi3,
    "mistral": _mistral,
}


def parse_rendered(
    query: str,
    prompt: str | None = None,
    fmt: str = "auto",
    *,
    index: int | None = None,
    reply_turns: str = "as-written",
) -> Parsed:
    """Parse policy-rendered text (prompt + reply) into messages ending with the reply.

    Args:
        query: the whole rendered text (prompt and reply), special tokens kept.
        prompt: the rendered prompt alone, when known (needed for "plain" and reply_turns="one").
        fmt: one of FORMATS.
        index: sample index quoted in errors.
        reply_turns: one of REPLY_TURNS.
    Raises:
        SampleError: naming field 'query' when no reply can be found.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"chat format must be one of {FORMATS}; got {fmt!r}")
    if reply_turns not in REPLY_TURNS:
        raise ConfigError(f"reply_turns must be one of {REPLY_TURNS}; got {reply_turns!r}")
    used = detect_format(query) if fmt == "auto" else fmt
    if used == "plain":
        return Parsed(_plain(query, prompt, index), "plain", fmt == "plain")
    if reply_turns == "one":
        return _one_reply(query, prompt, used, index)
    try:
        turns = _PARSERS[used](query)
    except ValueError as exc:
        raise SampleError(f"cannot parse as {used}: {exc}", index=index, field="query") from None
    messages: Conversation = []
    for role, content, _closed in turns:
        if role not in ("system", "user", "assistant"):
            role = "user" if role in ("human", "ipython", "tool") else role
        messages.append(
            {"role": role, "content": strip_end_tokens(content) if role == "assistant" else content}
        )
    if not messages or messages[-1]["role"] != "assistant":
        raise SampleError(f"no assistant reply found in the {used} text", index=index, field="query")
    if messages[0]["role"] == "system" and used == "llama3":
        # Llama 3.1's own header is the template's, not the user's: only what follows it is kept
        own = _LLAMA31_HEADER.sub("", messages[0]["content"], count=1)
        if own != messages[0]["content"]:
            messages = messages[1:] if not own.strip() else [{**messages[0], "content": own}, *messages[1:]]
    if messages[0]["role"] == "system" and messages[0]["content"].strip() in DEFAULT_SYSTEM_PROMPTS:
        messages = messages[1:]
    return Parsed(messages, used, True)


def _one_reply(query: str, prompt: str | None, fmt: str, index: int | None) -> Parsed:
    """The prompt's turns, then everything after the prompt as one assistant reply."""
    if not prompt:
        raise SampleError(
            "reply_turns='one' needs the item's prompt (OpenRLHF sends it in 'prompts')",
            index=index,
            field="prompts",
        )
    if not query.startswith(prompt):
        raise SampleError("the query does not start with its prompt", index=index, field="query")
    try:
        head = parse_rendered(prompt + _REPLY_SLOT, None, fmt, index=index)
        opened = head.messages[-1]["content"].strip() == _REPLY_SLOT
    except SampleError:
        opened = False
    if not opened:
        raise SampleError(
            f"the prompt does not end where a reply starts (its last {fmt} turn is not an open "
            "assistant turn)",
            index=index,
            field="prompts",
        )
    reply = strip_end_tokens(query[len(prompt) :]).strip()
    return Parsed([*head.messages[:-1], {"role": "assistant", "content": reply}], fmt, True)


def _plain(query: str, prompt: str | None, index: int | None) -> Conversation:
    if not prompt:
        raise SampleError(
            "plain text needs the prompt to split it from the reply", index=index, field="prompts"
        )
    if not query.startswith(prompt):
        raise SampleError("the query does not start with its prompt", index=index, field="query")
    reply = strip_end_tokens(query[len(prompt) :]).strip()
    for bos in ("<s>", "<|begin_of_text|>", "<bos>"):
        prompt = prompt.removeprefix(bos)
    return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": reply}]


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """The answer without its ``<think>...</think>`` reasoning, as POLAR's client strips it.

    Removes every closed block; text before a ``</think>`` with no opening tag (templates
    that put ``<think>`` in the prompt, e.g. Qwen3 and DeepSeek-R1) is reasoning too; an
    unclosed ``<think>`` (reasoning cut off by the length limit) leaves no answer: "".
    """
    text = _THINK_BLOCK.sub("", text)
    end = text.rfind("</think>")
    if end >= 0:
        text = text[end + len("</think>") :]
    start = text.find("<think>")
    if start >= 0:
        text = text[:start]
    return text.strip()


def without_reasoning(sample: Sample) -> Sample:
    """``sample`` with :func:`strip_reasoning` applied to every assistant turn and the reference."""
    messages = [
        dict(m, content=strip_reasoning(m["content"])) if m["role"] == "assistant" else m
        for m in sample.messages
    ]
    reference = None if sample.reference is None else strip_reasoning(sample.reference)
    return dataclasses.replace(sample, messages=messages, reference=reference)
