"""TRL adapter: WorldPM as a reward function for GRPOTrainer, RLOOTrainer, OnlineDPOTrainer
and AsyncGRPO (PPO on trl <= 1.12: :mod:`worldpm_reward.integrations.trl_ppo`).

    from worldpm_reward.integrations.trl import WorldPMReward
    trainer = GRPOTrainer(model=policy, reward_funcs=[WorldPMReward("Qwen/WorldPM-72B")], ...)

TRL calls ``reward_func(prompts, completions, completion_ids, **columns)``; this class
turns that call into the core's one verb (score a batch of conversations) and returns one
float per completion, or None for a completion that cannot be scored (TRL turns None
into NaN and ignores it). Prompts that are plain strings are one user turn; conversational
datasets pass message lists. Dataset columns arrive as keyword arguments: the reference
answer column for reference-relative rewards is ``shaping.reference_field``.

Backends (exactly one):
  * ``model=`` a checkpoint, scored in this process (colocated), loaded lazily on the
    first call on this process's own device, so the object pickles cheaply; with
    ``model_kwargs={"engine": "fsdp"}`` the training processes share ONE copy, sharded
    over them (:mod:`worldpm_reward.engines.sharded`: WorldPM-72B beside the policy);
  * ``url=`` one or more ``worldpm-reward serve`` endpoints (``RemoteScorer``);
  * ``scorer=`` any object with ``score_detailed(samples) -> list[ScoreResult]``.

Each call logs, through TRL's ``log_metric``: ``<name>/raw_mean``, ``<name>/raw_std``
(not logged on a call where nothing could be scored, so TRL's cross-rank average stays a
number), ``<name>/failed``, ``<name>/truncated`` and ``<name>/length_corr`` (the Pearson
correlation of raw score and completion length in tokens: a length-bias diagnostic); and
through ``log_extra`` the per-sample raw scores as column ``<name>_raw``. TRL logs the
returned rewards as ``rewards/<name>/mean``.

Outage policy (``on_outage``): when the scorer itself fails (every reward server down
after the client's retries and deadline, ``RemoteScoringError``), ``"raise"`` (default) stops
the run at that step: nothing is trained on missing rewards, and a resumed run starts from
the last checkpoint. ``"skip"`` keeps the run going: every completion of that call gets
TRL's None ("not applicable": GRPO/RLOO ignore it, so with no other reward function the
step carries no reward signal), ``<name>/failed`` counts them and a WARNING is logged.
Trade-off: "skip" survives a server restart at the cost of steps without reward signal
(wasted compute; other reward functions still count); "raise" wastes no compute on them but
needs a restart. Per-sample errors (a malformed completion) are always None + a warning.

OnlineDPO (``trl.experimental.online_dpo``) calls reward functions synchronously: use
:class:`WorldPMReward` (not the async class). It passes no ``log_metric``, so call
``reward.attach(trainer)`` once: the same ``<name>/*`` metrics then go into the trainer's
logs (OnlineDPO's ``stats``, averaged over the logging interval). It scores the two completions of each prompt
in one call (the first half against the second half) and turns None into 0, which could
win a pair; so on that call layout (detected, or forced with ``pairs=True``) a completion
that cannot be scored gets its partner's reward minus ``unscorable_margin``: it always loses.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from worldpm_reward.errors import ConfigError
from worldpm_reward.rewards import RewardBatch, RewardFunction
from worldpm_reward.samples import Scorer, ScoreResult
from worldpm_reward.shaping import ShapingConfig

logger = logging.getLogger(__name__)

__all__ = ["AsyncWorldPMReward", "WorldPMReward", "trl_samples"]


def _text(content: Any) -> Any:
    """Message content as TRL may give it: a string, or a list of typed parts (text only)."""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def trl_samples(prompts: Sequence[Any], completions: Sequence[Any]) -> list[Any]:
    """TRL's (prompt, completion) pairs as core samples; malformed ones are left for the core to reject."""
    samples: list[Any] = []
    for prompt, completion in zip(prompts, completions):
        if isinstance(prompt, str) and isinstance(completion, str):
            samples.append({"prompt": prompt, "response": completion})
        elif isinstance(prompt, list) and isinstance(completion, list):
            msgs = [
                dict(m, content=_text(m.get("content"))) if isinstance(m, Mapping) else m
                for m in [*prompt, *completion]
            ]
            samples.append({"messages": msgs})
        elif isinstance(prompt, list) and isinstance(completion, str):
            samples.append({"prompt": prompt, "response": completion})
        else:
            samples.append({"prompt": prompt, "response": completion})
    return samples


class WorldPMReward:
    """A picklable TRL reward function backed by WorldPM (or any supported reward model).

    Args:
        model: checkpoint (hub id or directory) to score in this process.
        url: server URL(s) of ``worldpm-reward serve`` to score remotely.
        scorer: a ready scorer (anything with ``score_detailed``).
        shaping: a :class:`ShapingConfig` (or its fields as a dict): normalization,
            clipping, reference-relative rewards. Default: raw scores.
        name: the name TRL logs the reward under (``rewards/<name>/mean``).
        model_kwargs: passed to ``RewardModel.from_pretrained`` (dtype, max_length, ...).
        client_kwargs: passed to ``RemoteScorer`` (token, timeout, retries, ...).
        pairs: OnlineDPO's layout (completion i against completion i + n/2): an unscorable
            completion then loses its pair instead of getting None (TRL's 0). Default (None):
            detected from the call (TRL's OnlineDPOTrainer: ``trainer_state`` without
            ``log_metric``, and the second half of the prompts repeating the first).
        unscorable_margin: how far below its partner an unscorable completion lands (keep it
            above OnlineDPO's ``missing_eos_penalty``).
        on_outage: "raise" (default) or "skip": what a call does when the scorer fails as a
            whole (see the module docstring for the trade-off).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        url: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        shaping: ShapingConfig | Mapping[str, Any] | None = None,
        name: str = "worldpm",
        model_kwargs: Mapping[str, Any] | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        pairs: bool | None = None,
        unscorable_margin: float = 10.0,
        on_outage: str = "raise",
    ) -> None:
        if sum(x is not None for x in (model, url, scorer)) != 1:
            raise ConfigError("WorldPMReward needs exactly one of model=..., url=... or scorer=...")
        if on_outage not in ("raise", "skip"):
            raise ConfigError(f"on_outage must be 'raise' or 'skip'; got {on_outage!r}")
        self.on_outage = on_outage
        self._pending: dict[str, list[float]] = {}  # metrics for attach()ed trainers
        self.model = None if model is None else str(model)
        self.url = url
        self.model_kwargs = dict(model_kwargs or {})
        self.client_kwargs = dict(client_kwargs or {})
        self.shaping = shaping if isinstance(shaping, ShapingConfig) else ShapingConfig(**dict(shaping or {}))
        self.pairs = pairs
        self.unscorable_margin = float(unscorable_margin)
        self.__name__ = name  # TRL names reward functions by __name__
        self._scorer = scorer
        self._reward: RewardFunction | None = None

    # -- pickling: never ship a loaded model or open connections -----------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.model is not None or self.url is not None:
            state["_scorer"] = None  # rebuilt lazily where it is unpickled
        if self._reward is not None:  # running normalization statistics travel with the object
            state["_shaper_state"] = self._reward.shaper.state_dict()
        state["_reward"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # "_shaper_state" is applied when the reward function is rebuilt

    def _build_scorer(self) -> Scorer:
        if self.model is not None:
            from worldpm_reward.scoring import RewardModel

            kwargs = dict(self.model_kwargs)
            if "device" not in kwargs and "device_map" not in kwargs:
                kwargs["device"] = _process_device()
            logger.info(
                "loading reward model %s in-process (%s)", self.model, kwargs.get("device", "device_map")
            )
            return RewardModel.from_pretrained(self.model, **kwargs)
        from worldpm_reward.serving.client import RemoteScorer

        assert self.url is not None
        return RemoteScorer(self.url, **self.client_kwargs)

    def _reward_fn(self) -> RewardFunction:
        if self._reward is None:
            if self._scorer is None:
                self._scorer = self._build_scorer()
            self._reward = RewardFunction(self._scorer, self.shaping)
            pending = self.__dict__.pop("_shaper_state", None)
            if pending is not None:
                self._reward.shaper.load_state_dict(pending)
        return self._reward

    # -- the TRL call ------------------------------------------------------------------
    def _samples(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> list[Any]:
        """Core samples; the reference column (``shaping.reference_field``) rides along as each
        sample's ``reference``: reference-based models (POLAR) read it, and so does
        reference-relative shaping."""
        samples = trl_samples(prompts, completions)
        column = kwargs.get(self.shaping.reference_field)
        if column is None:
            if self.shaping.needs_reference:
                raise ConfigError(
                    f"shaping.reference={self.shaping.reference!r} needs a dataset column "
                    f"'{self.shaping.reference_field}' with the reference answer; the dataset has none"
                )
            return samples
        for sample, ref in zip(samples, column):
            if ref is not None and not (isinstance(ref, str) and not ref.strip()):
                sample["reference"] = ref  # a string or a message list; checked with the sample
        return samples

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        samples = self._samples(prompts, completions, kwargs)
        try:
            batch = self._reward_fn()(samples)
        except Exception as exc:
            batch = self._outage(exc, len(samples))
        rewards = self._report(batch, completions, completion_ids, kwargs)
        if self.pairs or (self.pairs is None and _online_dpo_call(prompts, kwargs)):
            return list(pair_fallback(rewards, self.unscorable_margin, name=self.__name__))
        return rewards

    def _outage(self, exc: Exception, n: int) -> RewardBatch:
        """The scorer failed as a whole: raise, or (on_outage="skip") n unscored results."""
        from worldpm_reward.errors import SampleError

        if self.on_outage == "raise" or isinstance(exc, (SampleError, ValueError, TypeError)):
            raise exc  # a config or input bug is never an outage
        logger.warning(
            "%s: the reward scorer failed for all %d completions of this call; they get None "
            "(on_outage='skip'): %s",
            self.__name__,
            n,
            exc,
        )
        return RewardBatch([None] * n, [None] * n, [ScoreResult(error=f"scorer failed: {exc}")] * n)

    def attach(self, trainer: Any) -> None:
        """Log this reward's ``<name>/*`` metrics through a trainer that passes no
        ``log_metric`` (OnlineDPO): they are averaged into its ``stats`` at each step end."""
        from transformers import TrainerCallback

        reward = self

        class _Flush(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                stats = getattr(trainer, "stats", None)
                pending, reward._pending = reward._pending, {}
                if not isinstance(stats, dict):
                    return
                # every key of ours gets a value each step (OnlineDPO averages each list at
                # log time and would divide by zero on an empty one)
                ours = {k for k in stats if k.startswith(f"{reward.__name__}/")} | set(pending)
                for key in ours:
                    values = pending.get(key) or [math.nan]
                    stats.setdefault(key, []).append(sum(values) / len(values))

        self._attached = True
        trainer.add_callback(_Flush())

    def _report(
        self, batch: RewardBatch, completions: Sequence[Any], completion_ids: Any, kwargs: Mapping[str, Any]
    ) -> list[float | None]:
        name = self.__name__
        raw = [r for r in batch.raw if r is not None]
        errors = batch.errors
        for i, err in errors[:3]:
            logger.warning("%s: completion %d not scored: %s", name, i, err)
        if len(errors) > 3:
            logger.warning("%s: %d more completions not scored", name, len(errors) - 3)
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        if log_metric is None and getattr(self, "_attached", False):
            log_metric = self._collect
        if log_metric is not None:
            if raw:  # TRL averages sum/count over ranks: a rank with nothing scored adds nothing
                mean = sum(raw) / len(raw)
                log_metric(f"{name}/raw_mean", mean)
                log_metric(f"{name}/raw_std", math.sqrt(sum((x - mean) ** 2 for x in raw) / len(raw)))
            log_metric(f"{name}/failed", float(len(errors)))
            log_metric(f"{name}/truncated", float(sum(r.truncated for r in batch.results)))
            corr = length_correlation(batch.raw, _lengths(completions, completion_ids))
            if corr is not None:
                log_metric(f"{name}/length_corr", corr)
        log_extra: Callable[[str, list[Any]], None] | None = kwargs.get("log_extra")
        if log_extra is not None:
            log_extra(f"{name}_raw", list(batch.raw))
        return batch.rewards

    def _collect(self, key: str, value: float) -> None:
        self._pending.setdefault(key, []).append(float(value))


class AsyncWorldPMReward(WorldPMReward):
    """The same reward as an ``async`` callable: TRL 1.16's GRPO and RLOO run it concurrently
    with other async reward functions (and AsyncGRPO runs it in its CUDA-free worker process,
    where it should use ``url=`` so the worker never loads a model). OnlineDPO calls reward
    functions synchronously: give it :class:`WorldPMReward`."""

    async def __call__(  # type: ignore[override]
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        samples = self._samples(prompts, completions, kwargs)
        try:
            batch = await self._reward_fn().acall(samples)
        except Exception as exc:
            batch = self._outage(exc, len(samples))
        return self._report(batch, completions, completion_ids, kwargs)


def _online_dpo_call(prompts: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """TRL's OnlineDPOTrainer: ``prompts = 2 * prompts``, ``trainer_state`` and no ``log_metric``
    (GRPO and RLOO pass ``log_metric``)."""
    n = len(prompts)
    return (
        "trainer_state" in kwargs
        and "log_metric" not in kwargs
        and n >= 2
        and n % 2 == 0
        and list(prompts[: n // 2]) == list(prompts[n // 2 :])
    )


def pair_fallback(rewards: Sequence[float | None], margin: float, *, name: str = "worldpm") -> list[float]:
    """OnlineDPO pairs (i, i + n/2) with no None: an unscorable completion gets its partner's
    reward minus ``margin`` (so it is the rejected one); when neither can be scored, both get
    the same value (the lowest reward of the call minus ``margin``, or 0) and the pair is logged."""
    n = len(rewards)
    half = n // 2
    if n % 2:
        raise ConfigError(f"OnlineDPO pairs need an even number of completions, got {n}")
    scored = [r for r in rewards if r is not None]
    floor = (min(scored) - margin) if scored else 0.0
    out: list[float] = []
    for i, r in enumerate(rewards):
        partner = rewards[(i + half) % n]
        if r is not None:
            out.append(float(r))
        elif partner is not None:
            out.append(float(partner) - margin)
        else:
            if i < half:
                logger.warning("%s: neither completion of OnlineDPO pair %d could be scored", name, i)
            out.append(floor)
    return out


def length_correlation(raw: Sequence[float | None], lengths: Sequence[int | None]) -> float | None:
    """Pearson correlation of score and length over the scored samples (None if fewer than 3
    or either is constant): near +1 means the reward mostly pays for length."""
    pairs = [(float(r), float(n)) for r, n in zip(raw, lengths) if r is not None and n is not None]
    if len(pairs) < 3:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _lengths(completions: Sequence[Any], completion_ids: Any) -> list[int | None]:
    """Completion lengths in the policy's tokens when TRL passes them, else in characters."""
    if completion_ids is not None and len(completion_ids) == len(completions):
        return [len(ids) for ids in completion_ids]
    out: list[int | None] = []
    for c in completions:
        if isinstance(c, str):
            out.append(len(c))
        elif isinstance(c, list) and all(isinstance(m, Mapping) for m in c):
            out.append(sum(len(str(_text(m.get("content", "")))) for m in c))
        else:
            out.append(None)
    return out


def _process_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    return "cpu"
