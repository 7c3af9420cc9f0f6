"""Turn validated samples into the exact token ids a reward model was trained on.

WorldPM's training format (REFERENCE.md, model card): the conversation rendered with the
checkpoint's ChatML chat template with an EMPTY system message always present, tokenized
with ``add_special_tokens=False``, ending with ``<|endoftext|>`` exactly once: that last
token's hidden state is scored. Generic sequence-classification reward models use their
own chat template as is.

Tool turns (agentic rollouts) are rendered as their own turns the way Qwen2.5's chat
template (WorldPM's base) renders them, :func:`plain_turns`: an assistant turn's tool calls
become ``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`` blocks after its text,
and each run of tool results becomes ONE user turn of ``<tool_response>\n...\n</tool_response>``
blocks. The scored reply is the final assistant turn.

Over-long inputs keep their END (the reply and the scored token) and lose tokens from the
START; every cut is counted and reported, and a cut that reaches into the reply itself is
flagged so it is never silent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from worldpm_reward.config import Overflow
from worldpm_reward.errors import CheckpointError, ConfigError, SampleError
from worldpm_reward.samples import Conversation, Sample

#: Stands for the reply in a second rendering that finds where the reply starts (private-use
#: characters: no reply or template markup contains them).
_REPLY_MARK = "\ue000reply\ue000"


def _tool_call_text(call: dict[str, Any]) -> str:
    """One call as Qwen2.5's template writes it (transformers' ``tojson``: ``json.dumps`` with
    ``ensure_ascii=False``); arguments given as a JSON string are inserted as they are."""
    args = call["arguments"]
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + args_text + "}\n</tool_call>"


def plain_turns(sample: Sample) -> Sample:
    """The sample with tool turns rendered as plain ``{"role", "content"}`` turns (Qwen2.5's
    layout, see the module docstring); a sample without tool turns is returned as it is.

    Rendered through a plain ChatML template, the result is token for token what Qwen2.5's
    own template makes of the structured conversation."""
    if not sample.has_tool_turns:
        return sample
    out: Conversation = []
    previous = None
    for m in sample.messages:
        if m["role"] == "tool":
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if previous == "tool":  # a run of results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            calls = [_tool_call_text(c) for c in m.get("tool_calls") or ()]
            parts = ([m["content"]] if m["content"] else []) + calls
            out.append({"role": m["role"], "content": "\n".join(parts)})
        previous = m["role"]
    return replace(sample, messages=out)


@dataclass(frozen=True)
class Encoded:
    """Token ids for one sample; the score is read at ``input_ids[-1]``."""

    input_ids: list[int]
    num_truncated_tokens: int = 0
    response_truncated: bool = False

    @property
    def truncated(self) -> bool:
        return self.num_truncated_tokens > 0


class Encoder:
    """What the scorer needs from an input encoder: ``encode_batch`` returns, per sample,
    its :class:`Encoded` ids or the :class:`SampleError` that stopped it (never raises for one
    bad sample); ``encode`` is the single-sample form that raises."""

    max_length: int
    final_token_id: int | None

    @property
    def max_tokens(self) -> int:
        """The most tokens one encoded sample can have: ``max_length`` unless the encoding's own
        arithmetic can pass it (POLAR's), which engines size their limits by."""
        return self.max_length

    def encode_batch(
        self, samples: Sequence[Sample], indices: Sequence[int | None] | None = None
    ) -> list[Encoded | SampleError]:
        raise NotImplementedError

    def encode(self, sample: Sample, index: int | None = None) -> Encoded:
        """Encode one sample; raises SampleError if it cannot be encoded."""
        out = self.encode_batch([sample], [index])[0]
        if isinstance(out, SampleError):
            raise out
        return out


def _openai_layout(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [{"type": "function", "function": dict(c)} for c in calls]}


class ChatTemplateEncoder(Encoder):
    """Render conversations with a tokenizer's chat template and tokenize them.

    Args:
        tokenizer: a transformers tokenizer with a chat template (fast tokenizers give
            exact reply-truncation detection through offsets).
        max_length: most tokens per sample, the final scored token included.
        ensure_system: insert an empty system message when the conversation has none
            (WorldPM's training format; a user-given system message is kept).
        final_token: a token the ids must end with exactly once (appended when the
            template does not already end with it), or None to use the ids as rendered.
        overflow: "truncate" cuts from the start; "error" refuses over-long samples.
        chat_template: overrides the tokenizer's own template.
        tool_turns: "plain" (default): tool calls and results rendered as plain turns in
            Qwen2.5's layout (:func:`plain_turns`) before the template sees them; "template":
            handed to the chat template as structured messages (OpenAI layout), for a
            checkpoint whose own template renders tools.
        special_tokens_in_content: "text" (default): a message whose content contains the
            text of a control token (``<|im_end|>``, ``<|endoftext|>``, ...) has that content
            encoded as plain text, so a reply cannot close its own turn and forge another (a
            reward-hacking door in RL); "literal": the model card's call, which turns such
            strings into control tokens. Content without such strings encodes identically
            either way.
        scored_before: a token id that is never scored: trailing copies of it are dropped,
            so the sequence is read at the last other token. transformers' decoder
            ``*ForSequenceClassification`` classes read the last token that is not the pad
            id, so a classifier whose template ends with its pad id (pad = eos) scores the
            token before it; under causal attention, dropping the tokens after that position
            changes nothing before it.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        ensure_system: bool = False,
        final_token: str | None = None,
        overflow: Overflow = "truncate",
        chat_template: str | None = None,
        special_tokens_in_content: str = "text",
        tool_turns: str = "plain",
        scored_before: int | None = None,
    ) -> None:
        self.scored_before = scored_before
        if tool_turns not in ("plain", "template"):
            raise ConfigError(f"tool_turns must be 'plain' or 'template', got {tool_turns!r}")
        self.tool_turns = tool_turns
        if special_tokens_in_content not in ("text", "literal"):
            raise ConfigError(
                f"special_tokens_in_content must be 'text' or 'literal', got {special_tokens_in_content!r}"
            )
        self.content_as_text = special_tokens_in_content == "text"
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.control_strings = sorted(
            {str(getattr(t, "content", t)) for t in decoder.values() if str(getattr(t, "content", t))},
            key=len,
        )
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {max_length}")
        if overflow not in ("truncate", "error"):
            raise ConfigError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ensure_system = ensure_system
        self.overflow = overflow
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise CheckpointError(
                "the tokenizer has no chat template, so conversations cannot be rendered in the "
                "reward model's format; pass chat_template=... (a Jinja string) explicitly"
            )
        self.final_token_id: int | None = None
        if final_token is not None:
            tid = tokenizer.convert_tokens_to_ids(final_token)
            if tid is None or tokenizer.convert_ids_to_tokens(int(tid)) != final_token:
                raise CheckpointError(
                    f"the tokenizer has no {final_token!r} token, which this reward model scores; "
                    "is this the checkpoint's own tokenizer?"
                )
            self.final_token_id = int(tid)

    def render(self, sample: Sample) -> str:
        """The conversation as text, exactly as the chat template renders it."""
        messages: Conversation = list(sample.messages)
        if self.tool_turns == "template" and sample.has_tool_turns:
            messages = [_openai_layout(m) for m in messages]
        if self.ensure_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": ""}, *messages]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=False
        )
        if not isinstance(text, str):  # some tokenizers return a list for a single conversation
            text = text[0]
        return text

    def encode_batch(
        self, samples: Sequence[Sample], indices: Sequence[int | None] | None = None
    ) -> list[Encoded | SampleError]:
        """Encode many samples (one tokenizer call); a failure is returned in place, not raised."""
        indices = list(indices) if indices is not None else list(range(len(samples)))
        if self.tool_turns == "plain":
            samples = [plain_turns(s) for s in samples]
        texts: list[str | SampleError] = []
        for sample, idx in zip(samples, indices):
            try:
                texts.append(self.render(sample))
            except Exception as exc:  # a template may raise on unusual roles or content
                texts.append(SampleError(f"chat template failed: {exc}", index=idx, field="messages"))
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        # Content that spells a control token: encoded piecewise (markup as markup, content as text)
        piecewise: dict[int, tuple[list[int], Any]] = {}
        if self.content_as_text and self.control_strings:
            for i, (sample, text) in enumerate(zip(samples, texts)):
                if isinstance(text, str) and self._has_control_text(sample):
                    try:
                        piecewise[i] = self._encode_piecewise(sample, text, fast)
                    except Exception as exc:
                        texts[i] = SampleError(f"tokenizer failed: {exc}", index=indices[i], field="messages")
        good = [i for i, t in enumerate(texts) if isinstance(t, str) and i not in piecewise]
        batch: Any = {"input_ids": [], "offset_mapping": []}
        if good:
            try:
                batch = self.tokenizer(
                    [texts[i] for i in good], add_special_tokens=False, return_offsets_mapping=fast
                )
            except Exception:  # one text the tokenizer refuses must not cost the others: one by one
                kept = []
                for i in good:
                    try:
                        one = self.tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=fast)
                    except Exception as exc:
                        texts[i] = SampleError(f"tokenizer failed: {exc}", index=indices[i], field="messages")
                        continue
                    kept.append(i)
                    batch["input_ids"].append(one["input_ids"])
                    if fast:
                        batch["offset_mapping"].append(one["offset_mapping"])
                good = kept
        out: list[Encoded | SampleError] = [t if isinstance(t, SampleError) else Encoded([]) for t in texts]
        for j, i in enumerate(good):
            text = texts[i]
            assert isinstance(text, str)
            ids = list(batch["input_ids"][j])
            offsets = batch["offset_mapping"][j] if fast else None
            out[i] = self._finish(ids, offsets, text, samples[i], indices[i])
        for i, (ids, offsets) in piecewise.items():
            text = texts[i]
            if isinstance(text, str):
                out[i] = self._finish(ids, offsets, text, samples[i], indices[i])
        return out

    def _reply_start(self, text: str, sample: Sample) -> int:
        """Where the reply's content starts in ``text`` (its rendering), -1 if unknown. The
        conversation is rendered once more with a marker for the reply: searching the text for
        the reply itself can land in the markup around it (a reply "e" in ``<|im_end|>``)."""
        reply = sample.response
        marked = [*sample.messages[:-1], {**sample.messages[-1], "content": _REPLY_MARK}]
        try:
            at = self.render(replace(sample, messages=marked)).find(_REPLY_MARK)
        except Exception:  # a template that refuses the marker: the reply's last occurrence
            at = -1
        if at >= 0 and text.startswith(reply, at):
            return at
        return text.rfind(reply)

    def _has_control_text(self, sample: Sample) -> bool:
        return any(c in m["content"] for m in sample.messages for c in self.control_strings)

    def _encode_piecewise(self, sample: Sample, text: str, fast: bool) -> tuple[list[int], Any]:
        """The rendered text's ids with each message's content tokenized as plain text
        (``split_special_tokens``) and the template's markup as usual; offsets kept."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for m in sample.messages:
            content = m["content"]
            if not content:
                continue
            at = text.find(content, cursor)
            if at < 0:
                raise SampleError("the chat template altered a message's content; cannot encode it as text")
            spans.append((at, at + len(content)))
            cursor = at + len(content)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        start = 0
        pieces: list[tuple[int, int, bool]] = []
        for a, b in spans:
            if a > start:
                pieces.append((start, a, False))
            pieces.append((a, b, True))
            start = b
        if start < len(text):
            pieces.append((start, len(text), False))
        for a, b, as_text in pieces:
            enc = self.tokenizer(
                text[a:b], add_special_tokens=False, return_offsets_mapping=fast, split_special_tokens=as_text
            )
            ids.extend(enc["input_ids"])
            if fast:
                offsets.extend((a + x, a + y) for x, y in enc["offset_mapping"])
        return ids, (offsets if fast else None)

    def _finish(
        self, ids: list[int], offsets: Any, text: str, sample: Sample, index: int | None
    ) -> Encoded | SampleError:
        if self.scored_before is not None:
            while ids and ids[-1] == self.scored_before:
                ids.pop()
            if not ids:
                return SampleError(
                    f"the sample renders to pad tokens only (id {self.scored_before}); nothing to score",
                    index=index,
                    field="messages",
                )
        if self.final_token_id is not None and (not ids or ids[-1] != self.final_token_id):
            ids.append(self.final_token_id)
        excess = len(ids) - self.max_length
        if excess <= 0:
            return Encoded(ids)
        # Tokens before the reply: everything whose text starts before the reply's content.
        reply_start = self._reply_start(text, sample)
        if offsets is not None and reply_start >= 0:
            prefix_tokens = sum(1 for start, _ in offsets if start < reply_start)
        else:
            prefix_tokens = 0  # unknown: any cut counts as reaching into the reply
        if self.overflow == "error":
            return SampleError(
                f"{len(ids)} tokens exceed max_length={self.max_length} (overflow='error'); "
                "shorten the conversation or raise max_length",
                index=index,
                field="messages",
            )
        return Encoded(ids[excess:], num_truncated_tokens=excess, response_truncated=excess > prefix_tokens)
