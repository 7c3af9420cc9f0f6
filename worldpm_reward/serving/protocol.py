"""Protocol handling shared by every host (the HTTP server, the Ray Serve deployment).

:class:`RewardService` turns protocol payloads into samples (each parsed and its tokens
estimated once), scores them with an :class:`~worldpm_reward.samples.AsyncScorer` (the
cross-call batcher, or Ray Serve's batch method) through
:class:`~worldpm_reward.rewards.RewardFunction` (shaping) and builds the responses. It
knows no web framework: hosts map :class:`RequestError` to their own HTTP errors.

Protocols:
  * OpenRLHF ``/get_reward``: ``{"query": [...], "prompts": [...], "labels": [...]}`` ->
    ``{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}``. The query is the
    prompt and reply as the POLICY's tokenizer decoded them (special tokens kept); it is
    parsed back into messages (:mod:`worldpm_reward.policy_text`) and scored in the reward model's format.
    A bad item fails the request with 422 naming it (OpenRLHF cannot take a None reward).
  * native ``/v1/score``: ``{"samples": [...]}`` -> ``{"results": [{"score", "reward",
    "num_tokens", "truncated", "response_truncated", "error"}]}``; a bad item gets its
    own error, the others their scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from worldpm_reward.errors import ConfigError, RequestError, SampleError
from worldpm_reward.policy_text import FORMATS, REPLY_TURNS, parse_rendered
from worldpm_reward.rewards import RewardFunction, renumbered
from worldpm_reward.samples import (
    AsyncScorer,
    Sample,
    ScoreResult,
    estimate_tokens,
    is_reference,
    parse_sample,
)
from worldpm_reward.serving.config import DEFAULT_FALLBACK_REWARD
from worldpm_reward.shaping import ShapingConfig, sigmoid

logger = logging.getLogger(__name__)

SCORES = ("reward", "sigmoid")


class RewardService:
    """Protocol handling around an :class:`~worldpm_reward.samples.AsyncScorer`.

    Args:
        scorer: scores samples (batched by the host), results in input order.
        shaping: reward shaping applied to every request (raw scores are also returned).
        chat_format: how OpenRLHF queries are parsed: one of chat_formats.FORMATS.
        reply_turns: how the part of a query after its prompt is read: one of
            policy_text.REPLY_TURNS ("one": a single reply, its markup text).
        name: prefix of the extra_logs keys (``<name>_raw``, ...).
        max_items: most items per request (larger requests: 413).
        fallback_reward: OpenRLHF only: an item that cannot be scored gets this reward (and
            ``<name>_failed = 1`` in extra_logs, the reason in ``errors``) with status 200,
            instead of a 422 that OpenRLHF retries 5 times and then turns into a None reward
            that breaks its step. Default :data:`DEFAULT_FALLBACK_REWARD` (-10); None: 422.
        scores: what OpenRLHF's ``scores`` (used by its dynamic filtering, which keeps
            groups whose mean lies in ``--algo.dynamic_filtering_range``, (0, 1) by default)
            carry: "reward" (the reward itself) or "sigmoid" (``sigmoid(reward / scores_temperature)``,
            in (0, 1)).
        scores_temperature: the scale of the "sigmoid" mapping.
        max_request_tokens: most estimated tokens in one request (more: 413); None: no bound.
        on_results: called with each request's per-sample results (the server's metrics).
        on_unknown_format: called with the number of OpenRLHF queries of a request whose chat
            markup was not recognised.
    """

    def __init__(
        self,
        scorer: AsyncScorer,
        *,
        shaping: ShapingConfig | None = None,
        chat_format: str = "auto",
        reply_turns: str = "as-written",
        name: str = "worldpm",
        max_items: int = 4096,
        fallback_reward: float | None = DEFAULT_FALLBACK_REWARD,
        scores: str = "reward",
        scores_temperature: float = 1.0,
        max_request_tokens: int | None = None,
        on_results: Callable[[list[ScoreResult]], None] | None = None,
        on_unknown_format: Callable[[int], None] | None = None,
    ) -> None:
        if scores not in SCORES:
            raise ConfigError(f"scores must be one of {SCORES}; got {scores!r}")
        if not scores_temperature > 0:
            raise ConfigError(f"scores_temperature must be positive; got {scores_temperature!r}")
        self.fallback_reward = None if fallback_reward is None else float(fallback_reward)
        self.scores_mode = scores
        self.scores_temperature = float(scores_temperature)
        if chat_format not in FORMATS:
            raise ConfigError(f"chat_format must be one of {FORMATS}; got {chat_format!r}")
        if shaping is not None and shaping.group != "none":
            raise ConfigError(
                f"shaping.group={shaping.group!r} needs each prompt's whole group in one call, which a "
                "server does not see (OpenRLHF sends one sample per request); apply it on the trainer "
                "side, e.g. WorldPMReward(url=..., shaping={'group': 'bt_winrate'})"
            )
        self.reward = RewardFunction(scorer, shaping)
        self.chat_format = chat_format
        if reply_turns not in REPLY_TURNS:
            raise ConfigError(f"reply_turns must be one of {REPLY_TURNS}; got {reply_turns!r}")
        self.reply_turns = reply_turns
        self.name = name
        self.max_items = max_items
        self.max_request_tokens = max_request_tokens
        self.on_results = on_results
        self.on_unknown_format = on_unknown_format

    def _check_count(self, items: Sequence[Any]) -> None:
        if len(items) > self.max_items:
            raise RequestError(413, f"{len(items)} items in one request; the limit is {self.max_items}")

    def _check_tokens(self, items: Sequence[Any]) -> None:
        """``items``: parsed samples (their estimate is cached on them) or raw input."""
        if self.max_request_tokens is not None:
            tokens = sum(estimate_tokens(x) for x in items)
            if tokens > self.max_request_tokens:
                raise RequestError(
                    413,
                    f"about {tokens} tokens in one request; the limit is {self.max_request_tokens} "
                    "(split it into smaller requests)",
                )

    async def get_reward(
        self, query: list[Any], prompts: list[Any] | None, labels: list[Any] | None
    ) -> dict[str, Any]:
        """OpenRLHF's remote reward protocol."""
        self._check_count(query)
        for field, values in (("prompts", prompts), ("labels", labels)):
            if values is not None and len(values) != len(query):
                raise RequestError(
                    422, [{"field": field, "error": f"has {len(values)} items but query has {len(query)}"}]
                )
        samples: list[Any] = []  # parsed Samples
        sized: list[Any] = []  # each item as parsed (its estimate cached), or its raw query
        kept: list[int] = []  # the request index of each of `samples`
        bad: list[dict[str, Any]] = []
        unknown = 0
        for i, q in enumerate(query):
            try:
                if not isinstance(q, str):
                    raise SampleError(f"must be a string, got {type(q).__name__}", index=i, field="query")
                prompt = prompts[i] if prompts else None
                if prompt is not None and not isinstance(prompt, str):
                    raise SampleError(
                        f"must be a string, got {type(prompt).__name__}", index=i, field="prompts"
                    )
                parsed = parse_rendered(q, prompt, self.chat_format, index=i, reply_turns=self.reply_turns)
                sample: dict[str, Any] = {"messages": parsed.messages}
                label = labels[i] if labels is not None else None
                if is_reference(label) or (label is not None and self.reward.shaping.needs_reference):
                    # the reference answer (POLAR; reference-relative shaping), validated as on /v1/score
                    sample["reference"] = label
                samples.append(parse_sample(sample, i))  # validated once, before queueing
                sized.append(samples[-1])
                unknown += not parsed.recognised
                kept.append(i)
            except SampleError as exc:
                bad.append({"index": i, "field": exc.field, "error": str(exc)})
                sized.append(q)
        self._check_tokens(sized)
        if unknown and self.on_unknown_format is not None:
            self.on_unknown_format(unknown)
        if bad and self.fallback_reward is None:
            raise RequestError(422, bad)
        batch = await self.reward.acall(samples)
        self._report([*batch.results, *(ScoreResult(error=b["error"]) for b in bad)])
        # each error names the request's item (the scorer numbered only the parsed ones)
        errors = [(kept[i], renumbered(e, kept[i])) for i, e in batch.errors]
        if errors and self.fallback_reward is None:
            raise RequestError(422, [{"index": i, "field": "query", "error": e} for i, e in errors])
        # every item of the request, in order: scored, or (fallback mode) the fallback reward
        problems = {b["index"]: b for b in bad}
        for i, e in errors:
            problems[i] = {"index": i, "field": "query", "error": e}
        scored = dict(zip(kept, zip(batch.rewards, batch.raw, batch.results)))
        fallback = float(self.fallback_reward or 0.0)  # only reached in fallback mode
        rows = [
            (fallback, fallback, 0.0, 1.0)
            if i in problems
            else (float(scored[i][0]), float(scored[i][1]), float(scored[i][2].truncated), 0.0)  # type: ignore[arg-type]
            for i in range(len(query))
        ]
        rewards, raw, truncated, failed = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
        out: dict[str, Any] = {
            "rewards": rewards,
            "scores": self._scores(rewards),
            "extra_logs": {f"{self.name}_raw": raw, f"{self.name}_truncated": truncated},
        }
        if self.fallback_reward is not None:
            out["extra_logs"][f"{self.name}_failed"] = failed
            out["errors"] = [problems[i] for i in sorted(problems)]
            for p in out["errors"][:3]:
                logger.warning(
                    "item %d not scored, fallback reward %s: %s", p["index"], self.fallback_reward, p["error"]
                )
        return out

    def _scores(self, rewards: list[float]) -> list[float]:
        if self.scores_mode == "sigmoid":
            return [sigmoid(r / self.scores_temperature) for r in rewards]
        return list(rewards)

    async def score(self, samples: list[Any]) -> dict[str, Any]:
        """The native API: per-item results, per-item errors."""
        self._check_count(samples)
        parsed: list[Sample | SampleError] = []
        for i, s in enumerate(samples):  # each sample parsed once: RewardFunction takes these as they are
            try:
                parsed.append(parse_sample(s, i))
            except SampleError as exc:
                parsed.append(exc)
        self._check_tokens([p if isinstance(p, Sample) else s for p, s in zip(parsed, samples)])
        batch = await self.reward.acall(parsed)  # type: ignore[arg-type]
        self._report(batch.results)
        return {
            "model": self.name,
            "results": [
                {
                    "score": raw,
                    "reward": reward,
                    "num_tokens": r.num_tokens,
                    "truncated": r.truncated,
                    "response_truncated": r.response_truncated,
                    "error": r.error,
                }
                for raw, reward, r in zip(batch.raw, batch.rewards, batch.results)
            ],
        }

    def _report(self, results: list[ScoreResult]) -> None:
        if self.on_results is not None:
            self.on_results(results)
