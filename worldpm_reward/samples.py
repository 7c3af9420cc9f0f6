"""Input samples and per-sample results.

A *conversation* is a list of ``{"role", "content"}`` messages ending with the assistant
reply to be scored. Agentic rollouts add tool turns: an assistant message may carry
``tool_calls`` (OpenAI/TRL layout ``[{"type": "function", "function": {"name", "arguments"}}]``
or ``[{"name", "arguments"}]``) and a ``tool`` message holds one tool's result; they are
kept as their own turns (normalized: ``tool_calls`` becomes ``[{"name", "arguments"}]``) and
each family's encoder renders them in its format (:func:`worldpm_reward.encoder.plain_turns`).
The scored reply is always the final assistant turn; everything before it is context. Callers may also give a *prompt* (a string, taken as one user turn, or
a list of messages) plus a *response* string. This module turns either form into a
validated :class:`Sample`, or raises :class:`SampleError` naming the sample and field.
It knows nothing about tokenizers or models.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, TypeAlias, runtime_checkable

from worldpm_reward.errors import SampleError

#: ``{"role", "content"}``; an assistant message may also hold ``tool_calls``: a list of
#: ``{"name": str, "arguments": mapping | list | str}``.
Message: TypeAlias = dict[str, Any]
Conversation: TypeAlias = list[Message]
#: What the public scoring verb accepts per sample: a message list, or a mapping with
#: ``messages`` or ``prompt`` + ``response`` (and optionally ``reference``).
SampleLike: TypeAlias = Sequence[Mapping[str, Any]] | Mapping[str, Any]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sample:
    """A validated conversation; ``messages[-1]`` is the assistant reply being scored.

    ``reference`` is a reference answer for reference-based reward models (POLAR, or
    reference-relative shaping); WorldPM ignores it.
    """

    messages: Conversation
    reference: str | None = None

    @property
    def prompt_messages(self) -> Conversation:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def has_tool_turns(self) -> bool:
        """Whether any message is a tool result or carries tool calls."""
        return any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)

    @cached_property
    def estimated_tokens(self) -> int:
        """:func:`estimate_tokens` of this sample, computed once (a request's size check, the
        batcher's queue bound and the scorer process's time budget all read it)."""
        return _estimate({"messages": self.messages, "reference": self.reference})


@dataclass
class ScoreResult:
    """The outcome of scoring one sample.

    Attributes:
        score: the reward model's raw scalar (higher = more preferred; for WorldPM a
            Bradley-Terry logit: sigmoid(a - b) is P(a preferred over b)). None on error.
        num_tokens: tokens fed to the model, after truncation (0 on a formatting error).
        truncated: True when tokens were cut from the start of the input to fit max_length.
        num_truncated_tokens: how many tokens were cut.
        response_truncated: True when the cut reached into the scored reply itself.
        error: why the sample could not be scored (names the sample and field), else None.
    """

    score: float | None = None
    num_tokens: int = 0
    truncated: bool = False
    num_truncated_tokens: int = 0
    response_truncated: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None


def finite_or_error(results: list[ScoreResult], start_index: int | None = 0) -> list[ScoreResult]:
    """Turn a non-finite score (inf or NaN, e.g. an fp16/bf16 overflow) into that sample's
    error, in place, so that it never reaches shaping, running statistics or a client as a
    number (or as a null without a reason). ``start_index``: added to the positions quoted in
    the message (None: positions are not quoted). Returns ``results``."""
    for i, r in enumerate(results):
        score = r.score
        if r.error is None and score is not None and not _finite_number(score):
            where = "" if start_index is None else f"sample {start_index + i}: "
            r.error = (
                f"{where}the model returned a non-finite score ({score!r}); the input may overflow the "
                "model's dtype (try dtype float32)"
            )
            r.score = None
    return results


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns a batch of samples into per-sample results, in input order.

    Implemented by :class:`~worldpm_reward.scoring.RewardModel` (in process),
    :class:`~worldpm_reward.serving.scorer_process.ProcessScorer` (a child process),
    :class:`~worldpm_reward.serving.client.RemoteScorer` (remote) and
    :class:`~worldpm_reward.rewards.RewardFunction` (shaped results); the
    framework adapters depend on this seam only.
    """

    def score_detailed(self, samples: Sequence[SampleLike]) -> list[ScoreResult]: ...


@runtime_checkable
class AsyncScorer(Protocol):
    """The asynchronous scoring seam: a batch of samples in, per-sample results out, in input
    order, awaited on an event loop.

    Implemented by :class:`~worldpm_reward.batcher.DynamicBatcher` (cross-call batching around
    a sync :class:`Scorer`), :class:`~worldpm_reward.serving.client.RemoteScorer` and Ray
    Serve's batch method (:class:`~worldpm_reward.integrations.ray_batch.ServeBatchScorer`);
    :class:`~worldpm_reward.serving.protocol.RewardService` depends on this seam only.
    """

    async def ascore_detailed(self, samples: Sequence[SampleLike]) -> list[ScoreResult]: ...


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error quotes a prefix of bad input, never all of it."""
    text = (
        repr(value) if not isinstance(value, (list, dict, tuple)) or len(value) < 20 else type(value).__name__
    )
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_text(value: Any, *, index: int | None, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SampleError(f"expected a string, got {type(value).__name__}", index=index, field=field)
    if not allow_empty and not value.strip():
        raise SampleError("must not be empty", index=index, field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate: no tokenizer can take it
        raise SampleError(
            f"is not valid Unicode text: lone surrogate {value[exc.start]!r} at character {exc.start}",
            index=index,
            field=field,
        ) from None
    return value


def _check_messages(value: Any, *, index: int | None, field: str, final_assistant: bool) -> Conversation:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SampleError(
            f"expected a list of {{'role', 'content'}} messages, got {type(value).__name__}",
            index=index,
            field=field,
        )
    if len(value) == 0:
        raise SampleError("must contain at least one message", index=index, field=field)
    out: Conversation = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise SampleError(
                f"expected a mapping with 'role' and 'content', got {type(msg).__name__}",
                index=index,
                field=where,
            )
        role = msg.get("role")
        if role not in ROLES:
            raise SampleError(
                f"role must be one of {', '.join(ROLES)}; got {_short(role)}",
                index=index,
                field=f"{where}.role",
            )
        if role == "system" and i != 0:
            raise SampleError(
                "a system message is only allowed as the first message", index=index, field=f"{where}.role"
            )
        calls = _check_tool_calls(msg.get("tool_calls"), index=index, field=f"{where}.tool_calls", role=role)
        content = msg.get("content")
        if calls and content is None:
            content = ""  # a message that only calls tools
        content = _check_text(
            content,
            index=index,
            field=f"{where}.content",
            allow_empty=(role in ("system", "tool") or bool(calls)),
        )
        message: Message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    if final_assistant and out[-1]["role"] != "assistant":
        raise SampleError(
            f"the last message must be the assistant reply to score; got role {out[-1]['role']!r}",
            index=index,
            field=f"{field}[{len(out) - 1}].role",
        )
    if final_assistant and not any(m["role"] == "user" for m in out):
        raise SampleError(
            "the conversation has no user turn; the reply must answer a user message",
            index=index,
            field=field,
        )
    return out


def _check_tool_calls(value: Any, *, index: int | None, field: str, role: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls as ``[{"name", "arguments"}]`` ([] when it has none)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return []
    if role != "assistant":
        raise SampleError(
            f"only an assistant message may carry tool calls; this one is {role!r}", index=index, field=field
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SampleError(
            f"expected a list of tool calls, got {type(value).__name__}", index=index, field=field
        )
    calls = []
    for j, call in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(call, Mapping):
            raise SampleError(
                f"expected a mapping {{'function': {{'name', 'arguments'}}}}, got {type(call).__name__}",
                index=index,
                field=where,
            )
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise SampleError(
                f"expected a mapping with 'name' and 'arguments', got {type(fn).__name__}",
                index=index,
                field=f"{where}.function",
            )
        name = _check_text(fn.get("name"), index=index, field=f"{where}.name")
        arguments = fn.get("arguments", {})
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            _check_text(arguments, index=index, field=f"{where}.arguments", allow_empty=True)
        elif isinstance(arguments, (Mapping, list, tuple)):
            try:
                json.dumps(arguments, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise SampleError(
                    f"must be JSON-serializable: {exc}", index=index, field=f"{where}.arguments"
                ) from None
        else:
            raise SampleError(
                f"expected a mapping or a JSON string, got {type(arguments).__name__}",
                index=index,
                field=f"{where}.arguments",
            )
        calls.append({"name": name, "arguments": arguments})
    return calls


def is_reference(value: Any) -> bool:
    """Whether a free-form field (OpenRLHF ``labels``, veRL ``ground_truth``) holds a reference
    answer in a form :func:`reference_text` takes: non-blank text or a non-empty message list.
    Anything else (a number, a blank string) is not a reference and is left out."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def reference_text(value: Any, index: int | None = None, field: str = "reference") -> str:
    """A reference answer as text. Accepted as a string, or as a list of ``{role, content}``
    messages (as xtuner's POLAR client takes it): role names dropped, contents joined by
    newlines, the way POLAR's encoding joins message contents."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value:
            raise SampleError("must not be an empty message list", index=index, field=field)
        parts = []
        for i, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                raise SampleError(
                    f"expected a string or a list of {{'role', 'content'}} messages; item {i} is "
                    f"{type(msg).__name__}",
                    index=index,
                    field=field,
                )
            parts.append(_check_text(msg.get("content"), index=index, field=f"{field}[{i}].content"))
        value = "\n".join(parts)
    return _check_text(value, index=index, field=field)


def parse_sample(sample: Any, index: int | None = None) -> Sample:
    """Validate one sample in any accepted form and return it as a :class:`Sample`.

    Accepted forms:
      * a list of messages whose last message is from the assistant;
      * ``{"messages": [...]}``;
      * ``{"prompt": str | [messages], "response": str}``; a string prompt is one user turn.
    Either mapping form may carry ``"reference"``: a string or a message list
    (:func:`reference_text`). Other keys are ignored.
    """
    if isinstance(sample, Sample):
        return sample
    if isinstance(sample, Mapping):
        reference = sample.get("reference")
        if reference is not None:
            reference = reference_text(reference, index=index)
        if "messages" in sample and ("prompt" in sample or "response" in sample):
            raise SampleError(
                "give either 'messages' or 'prompt' + 'response', not both", index=index, field="messages"
            )
        if "messages" in sample:
            msgs = _check_messages(sample["messages"], index=index, field="messages", final_assistant=True)
            return Sample(msgs, reference)
        if "prompt" in sample or "response" in sample:
            if "response" not in sample:
                raise SampleError(
                    "missing; a sample with 'prompt' needs 'response'", index=index, field="response"
                )
            if "prompt" not in sample:
                raise SampleError(
                    "missing; a sample with 'response' needs 'prompt'", index=index, field="prompt"
                )
            prompt = sample["prompt"]
            if isinstance(prompt, str):
                prompt_msgs: Conversation = [
                    {"role": "user", "content": _check_text(prompt, index=index, field="prompt")}
                ]
            else:
                prompt_msgs = _check_messages(prompt, index=index, field="prompt", final_assistant=False)
                if prompt_msgs[-1]["role"] == "assistant":
                    raise SampleError(
                        "the prompt must not end with an assistant message (the response is scored as the reply)",
                        index=index,
                        field=f"prompt[{len(prompt_msgs) - 1}].role",
                    )
            response = _check_text(sample["response"], index=index, field="response")
            return Sample([*prompt_msgs, {"role": "assistant", "content": response}], reference)
        raise SampleError(
            f"a mapping sample needs 'messages' or 'prompt' + 'response'; got keys "
            f"{_short(sorted(map(str, sample))[:10], 120)}",
            index=index,
            field="messages",
        )
    msgs = _check_messages(sample, index=index, field="messages", final_assistant=True)
    return Sample(msgs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads_json(text: str) -> Any:
    """``json.loads`` for untrusted input: NaN, Infinity and numbers that overflow to inf are
    refused (ValueError), so nothing non-finite reaches scoring or is written back out."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


#: UTF-8 bytes per token assumed by :func:`estimate_tokens` for text other than digits; Qwen's
#: BPE averages about 4 bytes per token on English and about 3 on CJK text, so 3 over-counts
#: rather than under-counts. Digits are one token each in Qwen's vocabulary.
BYTES_PER_TOKEN = 3
#: Tokens added per message for chat markup (role header and end-of-turn); one more message
#: for the system turn a template may add.
TOKENS_PER_MESSAGE = 5
_DIGIT = re.compile(r"\d")


def estimate_tokens(sample: Any) -> int:
    """A cheap estimate of a sample's token count, for queue bounds before tokenization; on
    real conversations it is above the real count for 99% and at most 10% below it: UTF-8 bytes of all its text / :data:`BYTES_PER_TOKEN` (a digit counts
    as one token), plus :data:`TOKENS_PER_MESSAGE` per message and one more message. Any shape is accepted (nothing is validated)."""
    if isinstance(sample, Sample):
        return sample.estimated_tokens
    return _estimate(sample)


def _estimate(sample: Any) -> int:
    size, messages, stack = 0, 0, [sample]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            digits = len(_DIGIT.findall(item))
            size += len(item.encode("utf-8", "surrogatepass")) + (BYTES_PER_TOKEN - 1) * digits
        elif isinstance(item, dict):
            messages += "content" in item
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return size // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE * (max(messages, 1) + 1) + 1
