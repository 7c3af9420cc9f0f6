"""WorldPM as the reward of real TRL trainers (trl 1.16) on CPU, with a tiny policy whose
vocabulary and chat template differ from WorldPM's."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl", reason="needs the 'trl' extra: pip install 'worldpm-reward[trl]'")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import get_callable_name, is_async_callable
from wpr_policy import gsm8k_questions, tiny_policy

from worldpm_reward import RewardModel
from worldpm_reward.integrations.trl import AsyncWorldPMReward, WorldPMReward

pytestmark = pytest.mark.framework


class RecordingReward(WorldPMReward):
    """Remembers what TRL passed and what the adapter returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[Any], list[Any], list[Any], dict[str, Any]]] = []

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        out = super().__call__(prompts, completions, completion_ids, **kwargs)
        columns = {k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")}
        self.calls.append((list(prompts), list(completions), list(out), columns))
        return out


def _dataset(conversational: bool, n: int = 16, with_reference: bool = False) -> Dataset:
    qs = gsm8k_questions(n)
    data: dict[str, list[Any]] = {
        "prompt": [[{"role": "user", "content": q}] for q in qs] if conversational else qs
    }
    if with_reference:
        data["reference"] = [f"The answer to '{q[:30]}' is 42." for q in qs]
    return Dataset.from_dict(data)


def _as_conversation(prompt: Any, completion: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return [*prompt, *completion]


def _check_against_core(reward: RecordingReward, rm: RewardModel) -> int:
    """Every returned reward equals direct core scoring of the same conversation."""
    checked = 0
    for prompts, completions, returned, _ in reward.calls:
        convs = [_as_conversation(p, c) for p, c in zip(prompts, completions)]
        direct = rm.score_detailed(convs)
        for got, want in zip(returned, direct):
            if want.error is not None:
                assert got is None
            else:
                assert got is not None and abs(got - want.score) <= 1e-5
                checked += 1
    return checked


def _grpo_args(tmp_path: Path, **kw: Any) -> GRPOConfig:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
        save_strategy="no",
    )
    return GRPOConfig(**{**values, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_grpo_runs_and_logs_worldpm_rewards(tmp_path: Path, tiny_worldpm: Path, conversational: bool) -> None:
    policy, tok = tiny_policy()
    reward = RecordingReward(tiny_worldpm, model_kwargs={"device": "cpu"})
    assert get_callable_name(reward) == "worldpm"
    trainer = GRPOTrainer(
        model=policy,
        processing_class=tok,
        reward_funcs=[reward],
        args=_grpo_args(tmp_path),
        train_dataset=_dataset(conversational),
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "rewards/worldpm/mean" in h]
    assert len(steps) == 3
    assert all("worldpm/raw_mean" in h and "worldpm/failed" in h for h in steps)
    assert len(reward.calls) >= 3
    assert isinstance(reward.calls[0][0][0], list if conversational else str)
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    assert _check_against_core(reward, rm) >= 12
    # logged means are the means of what the adapter returned
    first = [r for r in reward.calls[0][2] if r is not None]
    assert abs(steps[0]["rewards/worldpm/mean"] - sum(first) / len(first)) <= 1e-4


@pytest.mark.slow
def test_rloo_runs(tmp_path: Path, tiny_worldpm: Path) -> None:
    _, tok = tiny_policy(tmp_path / "policy")  # RLOO rebuilds its reference model from the path
    reward = RecordingReward(tiny_worldpm, model_kwargs={"device": "cpu"})
    args = RLOOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
        save_strategy="no",
    )
    trainer = RLOOTrainer(
        model=str(tmp_path / "policy"),
        processing_class=tok,
        reward_funcs=[reward],
        args=args,
        train_dataset=_dataset(True),
    )
    trainer.train()
    assert len([h for h in trainer.state.log_history if "rewards/worldpm/mean" in h]) == 3
    assert _check_against_core(reward, RewardModel.from_pretrained(tiny_worldpm, device="cpu")) >= 12


class FailingScorer:
    """A real RewardModel that refuses the completions at chosen positions of each call."""

    def __init__(self, rm: RewardModel, fail: Any) -> None:
        self.rm, self.fail = rm, fail

    def score_detailed(self, samples: Any) -> list[Any]:
        from worldpm_reward.samples import ScoreResult

        results = self.rm.score_detailed(samples)
        bad = self.fail(len(samples))
        return [ScoreResult(error=f"sample {i}: refused") if i in bad else r for i, r in enumerate(results)]


@pytest.mark.slow
def test_online_dpo_scores_pairs_and_an_unscorable_completion_never_wins(
    tmp_path: Path, tiny_worldpm: Path
) -> None:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    policy, tok = tiny_policy()
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    # pair 0: its first completion fails; pair 1: both fail; pair 2+: both scored
    flaky = FailingScorer(rm, lambda n: {0, 1, n // 2 + 1})
    reward = RecordingReward(scorer=flaky)
    args = OnlineDPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        max_new_tokens=12,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = OnlineDPOTrainer(
        model=policy,
        processing_class=tok,
        reward_funcs=[reward],
        args=args,
        train_dataset=_dataset(True, n=8),
    )
    seen: list[Any] = []
    calculate = trainer._calculate_rewards_from_functions

    def recording(*a: Any, **kw: Any) -> Any:
        out = calculate(*a, **kw)
        seen.append(out.clone())
        return out

    trainer._calculate_rewards_from_functions = recording
    reward.attach(trainer)  # OnlineDPO passes no log_metric: the same metrics through its stats
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 2
    logged = [h for h in trainer.state.log_history if "worldpm/failed" in h]
    assert len(logged) == 2, trainer.state.log_history
    assert all(h["worldpm/failed"] == 3.0 for h in logged)  # 3 of 6 completions refused per call
    assert all("worldpm/raw_mean" in h and "worldpm/truncated" in h for h in logged)
    for rewards, (prompts, completions, returned, _) in zip(seen, reward.calls):
        n = len(returned)
        assert n == 6 and all(r is not None for r in returned)  # TRL would turn None into 0
        assert rewards[0] < rewards[n // 2]  # the unscorable one is the rejected one
        assert rewards[1] == rewards[n // 2 + 1]  # neither scorable: a tie, logged
        # the scored completions are exactly the core's scores of those conversations
        direct = rm.score([_as_conversation(prompts[i], completions[i]) for i in (2, n // 2, n - 1)])
        assert max(abs(returned[i] - d) for i, d in zip((2, n // 2, n - 1), direct)) <= 1e-5
        assert abs(returned[0] - (returned[n // 2] - reward.unscorable_margin)) <= 1e-6


def test_pair_layout_is_only_detected_for_online_dpo_calls() -> None:
    from worldpm_reward.integrations.trl import _online_dpo_call, pair_fallback

    prompts = ["a", "b", "a", "b"]
    assert _online_dpo_call(prompts, {"trainer_state": None})
    assert not _online_dpo_call(prompts, {"trainer_state": None, "log_metric": print})  # GRPO / RLOO
    assert not _online_dpo_call(["a", "a", "b", "b"], {"trainer_state": None})
    assert pair_fallback([1.0, None, None, None], 2.0) == [1.0, -1.0, -1.0, -1.0]
    assert pair_fallback([None, 3.0, 0.5, 4.0], 1.0) == [-0.5, 3.0, 0.5, 4.0]
    with pytest.raises(ValueError, match="even"):
        pair_fallback([1.0, 2.0, 3.0], 1.0)


@pytest.mark.slow
def test_a_rank_with_nothing_scorable_logs_no_nan(tmp_path: Path, tiny_worldpm: Path) -> None:
    import math

    policy, tok = tiny_policy()
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    reward = RecordingReward(scorer=FailingScorer(rm, lambda n: set(range(n))))
    trainer = GRPOTrainer(
        model=policy,
        processing_class=tok,
        reward_funcs=[reward],
        args=_grpo_args(tmp_path, max_steps=1),
        train_dataset=_dataset(False),
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "worldpm/failed" in h]
    assert logged and logged[0]["worldpm/failed"] == 4.0
    assert "worldpm/raw_mean" not in logged[0]
    assert not any(isinstance(v, float) and math.isnan(v) for k, v in logged[0].items() if "worldpm" in k)


@pytest.mark.slow
def test_length_bias_diagnostic_is_logged_and_correct(tmp_path: Path, tiny_worldpm: Path) -> None:
    from worldpm_reward.integrations.trl import length_correlation

    assert length_correlation([1.0, 2.0, 3.0, None], [10, 20, 30, 5]) == pytest.approx(1.0)
    assert length_correlation([3.0, 2.0, 1.0], [10, 20, 30]) == pytest.approx(-1.0)
    assert length_correlation([1.0, 1.0, 1.0], [1, 2, 3]) is None  # constant scores: undefined
    metrics: dict[str, float] = {}
    reward = WorldPMReward(tiny_worldpm, model_kwargs={"device": "cpu"})
    completions = ["Yes.", "Yes, it is.", "Yes, it is, because of the reasons below, which are many."]
    raw = reward(["Is it?"] * 3, completions, log_metric=metrics.__setitem__)
    lengths = [len(c) for c in completions]  # no completion_ids: characters
    mx, my = sum(raw) / 3, sum(lengths) / 3
    cov = sum((x - mx) * (y - my) for x, y in zip(raw, lengths))
    want = cov / (sum((x - mx) ** 2 for x in raw) * sum((y - my) ** 2 for y in lengths)) ** 0.5
    assert metrics["worldpm/length_corr"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow
def test_reference_relative_rewards_from_a_dataset_column(tmp_path: Path, tiny_worldpm: Path) -> None:
    policy, tok = tiny_policy()
    reward = RecordingReward(
        tiny_worldpm, model_kwargs={"device": "cpu"}, shaping={"reference": "difference"}
    )
    trainer = GRPOTrainer(
        model=policy,
        processing_class=tok,
        reward_funcs=[reward],
        args=_grpo_args(tmp_path, max_steps=1),
        train_dataset=_dataset(True, with_reference=True),
    )
    trainer.train()
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    prompts, completions, returned, columns = reward.calls[0]
    refs = columns["reference"]
    for p, c, got, ref in zip(prompts, completions, returned, refs):
        conv = _as_conversation(p, c)
        own, theirs = rm.score_detailed([conv, [*p, {"role": "assistant", "content": ref}]])
        if own.error is None:
            assert got is not None and abs(got - (own.score - theirs.score)) <= 1e-5


@pytest.mark.slow
def test_pickle_round_trip_is_cheap_and_scores_the_same(tiny_worldpm: Path) -> None:
    reward = WorldPMReward(tiny_worldpm, model_kwargs={"device": "cpu"}, shaping={"normalize": "running"})
    prompts = ["What is 2+2?", "Name a color."]
    completions = ["4", "Blue."]
    first = reward(prompts, completions)
    blob = pickle.dumps(reward)
    assert len(blob) < 10_000, "the loaded model must not be pickled"
    clone = pickle.loads(blob)
    assert clone.__name__ == "worldpm" and clone._scorer is None
    assert clone._reward_fn().shaper.stats == reward._reward_fn().shaper.stats  # running stats travel
    assert clone(prompts, completions) == reward(prompts, completions)
    assert first[0] is not None


@pytest.mark.slow
def test_unscorable_completion_is_none_not_a_number(tiny_worldpm: Path) -> None:
    reward = WorldPMReward(tiny_worldpm, model_kwargs={"device": "cpu"})
    metrics: dict[str, float] = {}
    out = reward(["q1", "q2", "q3"], ["fine", "   ", "ok"], log_metric=metrics.__setitem__)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert metrics["worldpm/failed"] == 1.0


class SlowPartnerAsyncReward(AsyncWorldPMReward):
    """Waits (up to 20 s) for the partner reward to start: only concurrent execution finishes quickly."""

    started: asyncio.Event | None = None

    async def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        await asyncio.wait_for(partner_started().wait(), timeout=20)
        return await super().__call__(prompts, completions, completion_ids, **kwargs)


_EVENTS: dict[int, asyncio.Event] = {}


def partner_started() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    return _EVENTS.setdefault(id(loop), asyncio.Event())


async def partner(prompts, completions, **kwargs):
    partner_started().set()
    await asyncio.sleep(0)
    return [0.0] * len(prompts)


@pytest.mark.slow
def test_async_form_is_run_concurrently_by_trl(tmp_path: Path, tiny_worldpm: Path) -> None:
    reward = SlowPartnerAsyncReward(tiny_worldpm, model_kwargs={"device": "cpu"})
    assert is_async_callable(reward) and is_async_callable(AsyncWorldPMReward(tiny_worldpm))
    policy, tok = tiny_policy()
    # our reward is listed FIRST: run serially it would wait for a partner that never started
    trainer = GRPOTrainer(
        model=policy,
        processing_class=tok,
        reward_funcs=[reward, partner],
        args=_grpo_args(tmp_path, max_steps=1),
        train_dataset=_dataset(True),
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/worldpm/mean" in h]
    assert logged and logged[0]["rewards/partner/mean"] == 0.0
    clone = pickle.loads(pickle.dumps(AsyncWorldPMReward(tiny_worldpm, shaping={"clip_max": 0.1})))
    assert is_async_callable(clone)
    assert asyncio.run(clone(["q"], ["a reply"]))[0] <= 0.1


def _async_grpo_child(reward: Any, prompts: list, completions: list, out: Any) -> None:
    """What AsyncGRPO's rollout worker does in its spawned, CUDA-free child process."""
    from trl.experimental.async_grpo.async_rollout_worker import _scrub_child_env

    _scrub_child_env()
    import torch

    async def score() -> list:
        assert is_async_callable(reward)
        return await reward(completions=completions, prompts=prompts, completion_ids=None)

    out.put((torch.cuda.is_available(), asyncio.run(score())))


@pytest.mark.slow
def test_async_reward_in_a_spawned_cuda_free_worker(tiny_worldpm: Path, tmp_path: Path) -> None:
    import multiprocessing as mp

    from wpr_servers import server_process

    prompts = [[{"role": "user", "content": q}] for q in gsm8k_questions(6)]
    completions = [[{"role": "assistant", "content": f"The answer is {i * 7}."}] for i in range(6)]
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(
        [_as_conversation(p, c) for p, c in zip(prompts, completions)]
    )
    with server_process(tiny_worldpm, log=tmp_path / "s.log") as (url, _):
        reward = AsyncWorldPMReward(url=url)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_async_grpo_child, args=(reward, prompts, completions, queue))
        child.start()
        cuda, got = queue.get(timeout=120)
        child.join(30)
    assert child.exitcode == 0 and cuda is False
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def test_outage_policy_raise_by_default_or_skip_with_none_and_a_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every reward server down: "raise" (default) stops the step with the client's error;
    "skip" gives TRL None for every completion, counts them in worldpm/failed and warns."""
    from worldpm_reward.errors import RemoteScoringError

    dead = {"retries": 0, "timeout_s": 2.0}  # nothing listens on port 9
    prompts, completions = ["q1", "q2", "q3"], ["a1", "a2", "a3"]
    with pytest.raises(RemoteScoringError):
        WorldPMReward(url="http://127.0.0.1:9", client_kwargs=dead)(prompts, completions)
    metrics: dict[str, float] = {}
    reward = WorldPMReward(url="http://127.0.0.1:9", client_kwargs=dead, on_outage="skip")
    with caplog.at_level("WARNING"):
        out = reward(prompts, completions, log_metric=metrics.__setitem__, trainer_state=None)
    assert out == [None, None, None]
    assert metrics["worldpm/failed"] == 3.0 and "worldpm/raw_mean" not in metrics
    assert any("on_outage='skip'" in r.getMessage() for r in caplog.records)
    skipping_async = AsyncWorldPMReward(url="http://127.0.0.1:9", client_kwargs=dead, on_outage="skip")
    assert asyncio.run(skipping_async(prompts, completions)) == [None, None, None]
    # a bad configuration is never taken for an outage
    with pytest.raises(ValueError, match="on_outage"):
        WorldPMReward(url="http://127.0.0.1:9", on_outage="ignore")
