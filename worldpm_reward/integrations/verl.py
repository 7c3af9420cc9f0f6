"""veRL reward functions backed by worldpm-reward (WorldPM or POLAR).

veRL (0.8, 0.9) computes rewards in its reward loop: ``reward.num_workers`` Ray actors
(8 by default), each running a reward manager (``naive`` by default) that calls
``compute_score(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)``
once per sample, concurrently. Config (the ``reward:`` section, or the legacy top-level
``custom_reward_function``)::

    reward:
      reward_manager: {name: naive}
      custom_reward_function:
        path: pkg://worldpm_reward.integrations.verl
        name: compute_score_async            # batched; compute_score is the plain per-sample form
        reward_kwargs:
          url: http://RM_HOST:8000           # worldpm-reward serve (recommended), or
          # model: Qwen/WorldPM-72B          # a checkpoint loaded in EVERY reward worker
          token_env: WORLDPM_REWARD_TOKEN    # read the bearer token from this variable
          client_kwargs: {timeout_s: 180}    # RemoteScorer options (retries, ...)
          shaping: {clip_min: -5, clip_max: 5}
          fallback: min

``compute_score_async`` gathers the concurrent calls of one reward worker (the naive
manager awaits all samples of its chunk at once) into one scoring call every
``batch_wait_ms`` (default 20) or ``max_batch`` samples (default 256): one HTTP request or
one batched forward pass instead of one per sample. Both forms return
``{"score": reward, "worldpm_raw": raw, "worldpm_failed": 0.0 | 1.0}``; veRL uses
``score`` and logs the other keys as reward extra info.

Inputs: the prompt is ``extra_info["prompt"]`` (a string or a message list, as in POLAR's
own veRL recipe); the reference answer is ``ground_truth`` (a string or a message list:
used by POLAR, and by WorldPM only with reference-relative shaping); the policy's output
is ``solution_str``.

Errors: a sample that cannot be scored (no prompt, a bad message, a failed request) gets
the ``fallback`` reward, with the reason logged and ``worldpm_failed = 1``; it never
raises into veRL's step. ``fallback``: ``"min"`` (default) is the reward floor: the
config's ``shaping.clip_min`` when set (the shipped config clips to [-5, 5], so a failure
ties the worst possible answer and never out-scores one), else ``-10`` or, once a real
reward at or below that was seen, that reward minus 1 (unclipped rewards are unbounded: only
``clip_min`` makes "never out-scores" a guarantee for rewards not yet produced). A number
is used as it is; ``fallback: raise`` restores all-or-nothing. When EVERY sample of a
scoring call fails (reward server down from the start, a bad URL), each gets that floor and
the worker logs an ERROR saying so: never a quiet 0.0.

Failure counts: veRL puts ``worldpm_raw`` / ``worldpm_failed`` in its validation metrics
and rollout/validation dumps, but its training metrics (``compute_data_metrics``) do not
read reward extras. So each reward worker also logs a summary line every
``report_every_s`` seconds (default 60; WARNING when something failed, else INFO):
``worldpm-reward: last 60 s: 512 samples, 3 failed (0.6%), fallback -5.0``; Ray forwards
the workers' logs to the driver's console, next to veRL's step metrics.
:func:`failure_stats` gives the same counts in the worker process.

Multi-turn / tool rollouts: veRL's tool agent loop keeps the tool results inside the
response (masked out of the loss) and the reward manager decodes it with
``skip_special_tokens=True``. When ``solution_str`` holds Hermes/Qwen tool markup
(``<tool_response>`` blocks, veRL's default ``hermes`` tool parser), it is split into the
trajectory's turns (:func:`split_tool_turns`): assistant turns with their ``<tool_call>``
blocks, tool results as tool turns; the FINAL assistant turn is the scored reply and the
rest is context. ``extra_info["messages"]`` (a full message list ending with the reply, e.g.
stored by a custom agent loop in its ``extra_fields``) is used as it is when present.

Where the model runs: with ``url`` every reward worker sends its batches to the same
server(s), which batch across workers and keep one set of normalization statistics
(``worldpm-reward serve --normalize running``): the default for multi-worker runs. With
``model`` each worker loads its own copy and keeps its own statistics (set
``reward.num_workers: 1`` for a large model). Settings may also come from environment
variables (``WORLDPM_REWARD_URL``, ``WORLDPM_REWARD_TOKEN``, ``WORLDPM_REWARD_MODEL``,
``WORLDPM_REWARD_DEVICE``, ``WORLDPM_REWARD_SHAPING`` as JSON, ``WORLDPM_REWARD_FALLBACK``);
they reach veRL's Ray workers through ``ray_kwargs.ray_init.runtime_env.env_vars``.
``reward_kwargs`` travel with veRL's config and need no such plumbing.

``compute_score_batch`` (veRL <= 0.5's ``batch`` reward manager, since removed) is kept
with the same per-sample fallbacks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from worldpm_reward.batcher import BatchReport, DynamicBatcher
from worldpm_reward.errors import ConfigError, SampleError
from worldpm_reward.rewards import RewardFunction, RewardResult
from worldpm_reward.samples import is_reference
from worldpm_reward.shaping import ShapingConfig

__all__ = [
    "FALLBACK_FLOOR",
    "batch_stats",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "failure_stats",
    "split_tool_turns",
]

logger = logging.getLogger(__name__)

_SETTINGS = (
    "url",
    "token",
    "token_env",
    "client_kwargs",
    "model",
    "model_kwargs",
    "shaping",
    "fallback",
    "report_every_s",
)
#: ``fallback: min`` without ``shaping.clip_min``: the failure reward (or 1 below the lowest
#: real reward seen, when that is lower).
FALLBACK_FLOOR = -10.0


class _Backend:
    """One scorer + shaping (+ the cross-call batcher per event loop) for one settings dict."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        env = os.environ
        url = settings.get("url") or env.get("WORLDPM_REWARD_URL")
        model = settings.get("model") or env.get("WORLDPM_REWARD_MODEL")
        shaping = settings.get("shaping")
        if shaping is None:
            shaping = json.loads(env.get("WORLDPM_REWARD_SHAPING", "{}"))
        fallback = settings.get("fallback", env.get("WORLDPM_REWARD_FALLBACK", "min"))
        if fallback not in ("min", "raise"):
            try:
                fallback = float(fallback)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"fallback: expected a number, 'min' or 'raise'; got {fallback!r}"
                ) from None
        self.fallback: float | str = fallback
        self.lowest: float | None = None
        self.report_every_s = float(settings.get("report_every_s", 60.0))
        self.window = [0, 0]  # samples, failed since the last summary line
        self.totals = [0, 0]
        self.last_report = time.monotonic()
        if url:
            from worldpm_reward.serving.client import RemoteScorer

            token = settings.get("token") or env.get(str(settings.get("token_env") or "WORLDPM_REWARD_TOKEN"))
            scorer: Any = RemoteScorer(url, token=token, **dict(settings.get("client_kwargs") or {}))
        elif model:
            from worldpm_reward.scoring import RewardModel

            kwargs = dict(settings.get("model_kwargs") or {})
            if "device" not in kwargs and "device_map" not in kwargs and env.get("WORLDPM_REWARD_DEVICE"):
                kwargs["device"] = env["WORLDPM_REWARD_DEVICE"]
            logger.warning(
                "worldpm-reward: loading %s in this veRL reward worker (each of reward.num_workers loads "
                "its own copy and keeps its own statistics; 'url' shares one server)",
                model,
            )
            scorer = RewardModel.from_pretrained(model, **kwargs)
        else:
            raise ConfigError(
                "veRL reward: set reward_kwargs.url (worldpm-reward serve URLs) or reward_kwargs.model "
                "(a checkpoint), or the WORLDPM_REWARD_URL / WORLDPM_REWARD_MODEL environment variables"
            )
        self.shaping = ShapingConfig(**shaping)
        self.reward = RewardFunction(scorer, self.shaping)
        self.lock = threading.Lock()
        self.batchers: dict[asyncio.AbstractEventLoop, Any] = {}
        self.batches = 0
        self.samples = 0
        self._last_failure: BaseException | None = None

    def score(self, samples: Sequence[Any]) -> list[RewardResult]:
        """Score and shape one batch (a :class:`SampleError` in ``samples`` is that sample's
        result); a scorer that fails for the whole batch fails each sample, never raises."""
        samples = list(samples)
        try:
            out = cast(list[RewardResult], self.reward.score_detailed(samples))
        except Exception as exc:  # e.g. every server unreachable after retries: these samples fail
            logger.warning("worldpm-reward: scoring %d samples failed: %s", len(samples), exc)
            out = [
                RewardResult(error=str(s) if isinstance(s, SampleError) else f"scoring failed: {exc}")
                for s in samples
            ]
        failed = self._tally(out)
        with self.lock:
            self.batches += 1
            self.samples += len(out)
            self._count(len(out), failed)
        if out and failed == len(out) and self.fallback != "raise":
            self._all_failed(len(out), out[0].error)
        return out

    def _tally(self, results: Sequence[RewardResult]) -> int:
        """Track the lowest real reward; the number of failed results."""
        failed = 0
        with self.lock:
            for r in results:
                if r.reward is not None and r.error is None:
                    self.lowest = r.reward if self.lowest is None else min(self.lowest, r.reward)
                else:
                    failed += 1
        return failed

    def _all_failed(self, n: int, error: str | None) -> None:
        logger.error(
            "worldpm-reward: ALL %d samples of this scoring call failed, each gets the fallback reward "
            "%s (first error: %s); is the reward server up and reachable from the reward workers?",
            n,
            self.floor() if self.fallback == "min" else self.fallback,
            error,
        )

    def _count(self, samples: int, failed: int) -> None:
        """Failure counts, and the periodic summary line (called under the lock)."""
        for counts in (self.window, self.totals):
            counts[0] += samples
            counts[1] += failed
        now = time.monotonic()
        if now - self.last_report < self.report_every_s:
            return
        n, f = self.window
        logger.log(
            logging.WARNING if f else logging.INFO,
            "worldpm-reward: last %.0f s: %d samples, %d failed (%.1f%%), fallback %s",
            now - self.last_report,
            n,
            f,
            100.0 * f / max(n, 1),
            self.floor() if self.fallback == "min" else self.fallback,
        )
        self.window = [0, 0]
        self.last_report = now

    def floor(self) -> float:
        """``fallback: min``: the reward an unscorable sample gets (see the module docstring)."""
        if self.shaping.clip_min is not None:
            return float(self.shaping.clip_min)
        if self.lowest is not None and self.lowest - 1.0 < FALLBACK_FLOOR:
            return float(self.lowest) - 1.0
        return FALLBACK_FLOOR

    def finish(self, outcome: RewardResult) -> dict[str, float]:
        if outcome.reward is not None and outcome.error is None:
            raw = float(outcome.score if outcome.score is not None else outcome.reward)
            return {"score": float(outcome.reward), "worldpm_raw": raw, "worldpm_failed": 0.0}
        if self.fallback == "raise":
            raise SampleError(outcome.error or "sample could not be scored")
        with self.lock:
            value = self.floor() if self.fallback == "min" else float(self.fallback)
        logger.warning("worldpm-reward: sample not scored, reward %s: %s", value, outcome.error)
        return {"score": float(value), "worldpm_raw": float(value), "worldpm_failed": 1.0}

    def _batched(self, report: BatchReport) -> None:
        with self.lock:
            self.batches += 1
            self.samples += report.samples
        # the sync path's alarm: a model call whose every sample failed (the server down or unreachable)
        if report.samples and report.failed == report.samples and self.fallback != "raise":
            self._all_failed(report.samples, report.first_error)

    async def submit(self, sample: Any, max_batch: int, wait_s: float) -> RewardResult:
        """Score one sample together with this event loop's other concurrent calls (the
        cross-call batcher around this backend's RewardFunction)."""
        if isinstance(sample, SampleError):  # never queued; counted among the samples handled
            outcome = RewardResult(error=str(sample))
            with self.lock:
                self.samples += 1
        else:
            loop = asyncio.get_running_loop()
            batcher = self.batchers.get(loop)
            if batcher is None:
                self.batchers = {k: v for k, v in self.batchers.items() if not k.is_closed()}
                batcher = DynamicBatcher(
                    self.reward,
                    max_batch_samples=max_batch,
                    max_wait_s=wait_s,
                    max_queue=1 << 30,
                    on_batch=self._batched,
                )
                batcher.start()
                self.batchers[loop] = batcher
            try:
                (result,) = await batcher.ascore_detailed([sample])
                outcome = result  # type: ignore[assignment]  # the RewardFunction's RewardResult
            except Exception as exc:  # the whole batch failed (e.g. every server unreachable)
                if exc is not self._last_failure:  # once per failed batch, not once per sample
                    self._last_failure = exc
                    logger.warning("worldpm-reward: scoring a batch failed: %s", exc)
                outcome = RewardResult(error=f"scoring failed: {exc}")
        failed = self._tally([outcome])
        with self.lock:
            self._count(1, failed)
        return outcome


_lock = threading.Lock()
_backends: dict[str, _Backend] = {}


#: environment variables a backend reads (the token's is left out of the key: it is not a setting)
_ENV = tuple(f"WORLDPM_REWARD_{name}" for name in ("URL", "MODEL", "SHAPING", "FALLBACK", "DEVICE"))


def _backend(kwargs: Mapping[str, Any]) -> _Backend:
    settings = {k: kwargs[k] for k in _SETTINGS if k in kwargs}
    env = {k: os.environ.get(k) for k in _ENV}  # the same kwargs under another environment: another backend
    key = json.dumps({"settings": settings, "env": env}, sort_keys=True, default=str)
    with _lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = _Backend(settings)
        return backend


_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
# role headers left by a decode with skip_special_tokens=True ("<|im_start|>user\n" -> "user\n")
_USER_HEADER = re.compile(r"(?:^|\n)[ \t]*(?:user|tool)[ \t]*\n?$")
_ASSISTANT_HEADER = re.compile(r"^\s*assistant\s*\n")


def _assistant_turn(text: str) -> dict[str, Any]:
    """An assistant segment: its ``<tool_call>`` blocks as tool calls, the rest as its text
    (a block that is not a ``{"name", "arguments"}`` JSON object stays text)."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            return match.group(0)
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        return ""

    message: dict[str, Any] = {"role": "assistant", "content": _TOOL_CALL.sub(take, text).strip()}
    if calls:
        message["tool_calls"] = calls
    return message


def split_tool_turns(response: str) -> list[dict[str, Any]] | None:
    """A veRL multi-turn response (tool results inside it, Hermes/Qwen markup, decoded with
    or without special tokens) as turns: ``[assistant, tool, ..., assistant]``; the last is
    the reply to score. None when the response holds no tool result.

    A ``<tool_response>`` block is a tool result where the template put it: after a user (or
    tool) role header, or right after another result. Anywhere else (a reply that quotes the
    markup) it is the reply's own text."""
    text = response.replace("<|im_end|>", "").replace("<|im_start|>", "")
    matches: list[re.Match[str]] = []
    for m in _TOOL_RESPONSE.finditer(text):
        before = text[matches[-1].end() if matches else 0 : m.start()]
        if (matches and not before.strip()) or _USER_HEADER.search(before):
            matches.append(m)
    if not matches:
        return None
    turns: list[dict[str, Any]] = []
    cursor = 0
    for k, m in enumerate(matches):
        between = text[cursor : m.start()]
        if k == 0 or between.strip():
            segment = _USER_HEADER.sub("", _ASSISTANT_HEADER.sub("", between))
            if k > 0 or segment.strip():
                turns.append(_assistant_turn(segment))
        turns.append({"role": "tool", "content": m.group(1)})
        cursor = m.end()
    turns.append(_assistant_turn(_ASSISTANT_HEADER.sub("", text[cursor:])))
    return turns


def _sample(index: int, solution: Any, truth: Any, info: Any) -> Any:
    """A core sample, or the :class:`SampleError` saying why it cannot be one."""
    messages = info.get("messages") if isinstance(info, Mapping) else None
    prompt = info.get("prompt") if isinstance(info, Mapping) else None
    if messages is None and prompt is None:
        return SampleError(
            "missing; put the prompt in extra_info['prompt']", index=index, field="extra_info.prompt"
        )
    sample: dict[str, Any]
    turns = split_tool_turns(solution) if messages is None and isinstance(solution, str) else None
    if messages is not None:
        sample = {"messages": messages}
    elif turns is not None:
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
        sample = {"messages": [*context, *turns]}
    else:
        sample = {"prompt": prompt, "response": solution}
    if is_reference(truth):
        sample["reference"] = truth  # text or a message list (samples.reference_text)
    return sample


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> dict[str, float]:
    """veRL's per-sample reward function (one scoring call per sample; see the module docstring)."""
    backend = _backend(kwargs)
    (outcome,) = backend.score([_sample(0, solution_str, ground_truth, extra_info)])
    return backend.finish(outcome)


async def compute_score_async(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Any = None,
    *,
    max_batch: int = 256,
    batch_wait_ms: float = 20.0,
    **kwargs: Any,
) -> dict[str, float]:
    """veRL's async reward function: concurrent calls in one worker are scored together."""
    backend = _backend(kwargs)
    outcome = await backend.submit(
        _sample(0, solution_str, ground_truth, extra_info), int(max_batch), float(batch_wait_ms) / 1000.0
    )
    return backend.finish(outcome)


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any],
    **kwargs: Any,
) -> list[float]:
    """veRL <= 0.5's batched form: one float per sample (unscorable ones get the fallback)."""
    backend = _backend(kwargs)
    samples = [_sample(i, *a) for i, a in enumerate(zip(solution_strs, ground_truths, extra_infos))]
    return [backend.finish(o)["score"] for o in backend.score(samples)]


def failure_stats() -> dict[str, int]:
    """Samples and failed samples so far in this process (all settings together)."""
    with _lock:
        return {
            "samples": sum(b.totals[0] for b in _backends.values()),
            "failed": sum(b.totals[1] for b in _backends.values()),
        }


def batch_stats() -> dict[str, float]:
    """Scoring calls and samples handled so far in this process (all settings together; a
    sample that cannot be scored, e.g. without a prompt, counts as a sample, not a call)."""
    with _lock:
        batches = sum(b.batches for b in _backends.values())
        samples = sum(b.samples for b in _backends.values())
    return {"batches": batches, "samples": samples, "mean_batch": samples / batches if batches else math.nan}
