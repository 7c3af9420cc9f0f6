"""Reward shaping: running/fixed normalization, clipping, reference-relative rewards, calibration."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from wpr_testutils import real_conversations

from worldpm_reward import RewardModel
from worldpm_reward.cli import main
from worldpm_reward.rewards import RewardFunction
from worldpm_reward.shaping import RewardShaper, RunningStats, ShapingConfig, read_calibration


def test_welford_matches_two_pass_statistics() -> None:
    rng = random.Random(0)
    xs = [rng.gauss(3.0, 2.0) for _ in range(1000)]
    s = RunningStats.of(xs)
    assert s.count == 1000
    assert abs(s.mean - statistics.fmean(xs)) < 1e-12
    assert abs(s.std - statistics.pstdev(xs)) < 1e-9


def test_merge_equals_concatenation() -> None:
    rng = random.Random(1)
    parts = [
        [rng.gauss(rng.uniform(-5, 5), rng.uniform(0.1, 3)) for _ in range(rng.randint(0, 50))]
        for _ in range(7)
    ]
    merged = RunningStats()
    for p in parts:
        merged = merged.merge(RunningStats.of(p))
    flat = [x for p in parts for x in p]
    assert merged.count == len(flat)
    assert abs(merged.mean - statistics.fmean(flat)) < 1e-12
    assert abs(merged.std - statistics.pstdev(flat)) < 1e-9


def _rank_worker(
    rank: int, world: int, init_file: str, batches: list[list[list[float]]], out_dir: str
) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shaper = RewardShaper(ShapingConfig(normalize="running"))
    shaped = [shaper(batch[rank]).rewards for batch in batches]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"stats": shaper.state_dict(), "shaped": shaped}))
    from wpr_sharded import leave_distributed_job

    leave_distributed_job()  # destroys the group; exits without gloo's exit-time abort


@pytest.mark.slow
def test_running_normalization_merged_across_two_processes(tmp_path: Path) -> None:
    rng = random.Random(2)
    # 3 steps; each process gets its own slice (different sizes) per step
    batches = [[[rng.gauss(1, 2) for _ in range(rng.randint(3, 9))] for _ in range(2)] for _ in range(3)]
    mp.start_processes(
        _rank_worker,
        args=(2, str(tmp_path / "init"), batches, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    flat = [x for step in batches for part in step for x in part]
    for rep in reports:
        stats = RunningStats(**rep["stats"])
        assert stats.count == len(flat)
        assert abs(stats.mean - statistics.fmean(flat)) < 1e-9
        assert abs(stats.std - statistics.pstdev(flat)) < 1e-9
    # the last step's rewards on rank 1 are normalized with the global statistics
    gm, gs = statistics.fmean(flat), statistics.pstdev(flat)
    want = [(x - gm) / (gs + 1e-6) for x in batches[-1][1]]
    assert max(abs(a - b) for a, b in zip(reports[1]["shaped"][-1], want)) < 1e-9


def test_shaping_order_clip_and_none() -> None:
    cfg = ShapingConfig(normalize="fixed", mean=1.0, std=2.0, clip_min=-1.0, clip_max=0.5)
    out = RewardShaper(cfg)([1.0, 5.0, -9.0, None])
    assert out.rewards == [0.0, 0.5, -1.0, None]
    assert out.raw == [1.0, 5.0, -9.0, None]


def test_reference_modes() -> None:
    diff = RewardShaper(ShapingConfig(reference="difference"))([2.0, 1.0, None], [1.5, 1.0, 0.0])
    assert diff.rewards == [0.5, 0.0, None]
    bt = RewardShaper(ShapingConfig(reference="bt_probability"))([2.0, -800.0], [1.0, 0.0])
    assert abs(bt.rewards[0] - 1 / (1 + math.exp(-1.0))) < 1e-12 and bt.rewards[1] == 0.0
    with pytest.raises(ValueError, match="field 'reference'"):
        RewardShaper(ShapingConfig(reference="difference"))([1.0])


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"normalize": "zscore"}, "shaping.normalize"),
        ({"normalize": "fixed"}, "shaping.calibration_file"),
        ({"normalize": "fixed", "mean": 0.0, "std": 0.0}, "shaping.std must be positive"),
        ({"clip_min": 1.0, "clip_max": 0.0}, "shaping.clip_min"),
        ({"reference": "ratio"}, "shaping.reference"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        ShapingConfig(**kwargs)


@pytest.mark.slow
def test_reference_relative_scores_each_reference_once(reward_model) -> None:
    calls: list[int] = []

    class Counting:
        def score_detailed(self, samples):
            calls.append(len(samples))
            return reward_model.score_detailed(samples)

    fn = RewardFunction(Counting(), ShapingConfig(reference="difference"))
    prompt = "Tips for better sleep?"
    samples = [
        {"prompt": prompt, "response": r, "reference": "Keep a schedule."} for r in ("a", "b", "c", "d")
    ]
    samples.append({"prompt": prompt, "response": "e"})  # no reference: an error, not a number
    batch = fn(samples)
    assert calls == [6]  # 5 responses + 1 distinct reference, in one call
    ref = reward_model.score([{"prompt": prompt, "response": "Keep a schedule."}])[0]
    raw = reward_model.score([{"prompt": prompt, "response": r} for r in "abcd"])
    assert batch.rewards[:4] == pytest.approx([r - ref for r in raw], abs=1e-5)
    assert batch.rewards[4] is None and "missing reference" in batch.results[4].error
    assert batch.raw[4] is not None  # its own raw score is still kept for logging


@pytest.mark.slow
def test_calibration_round_trip(tmp_path: Path, tiny_worldpm: Path) -> None:
    convs = real_conversations(40)
    data = tmp_path / "calib.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in convs) + '{"prompt": "x", "response": ""}\n'
    )
    out = tmp_path / "calib.json"
    assert (
        main(["calibrate", "--model", str(tiny_worldpm), "--device", "cpu", str(data), "-o", str(out)]) == 0
    )
    calib = read_calibration(out)
    raw = RewardModel.from_pretrained(tiny_worldpm, device="cpu").score(convs)
    assert calib.count == len(convs)
    assert abs(calib.mean - statistics.fmean(raw)) < 1e-6 and abs(calib.std - statistics.pstdev(raw)) < 1e-6
    shaped = RewardShaper(ShapingConfig(normalize="fixed", calibration_file=str(out)))(raw).rewards
    assert abs(statistics.fmean(shaped)) < 1e-5 and abs(statistics.pstdev(shaped) - 1.0) < 1e-4
    os.remove(out)
    with pytest.raises(ValueError, match="calibration_file"):
        ShapingConfig(normalize="fixed", calibration_file=str(out))


def test_group_win_rates_match_a_direct_computation_and_need_groups() -> None:
    from worldpm_reward.shaping import group_win_rates

    rng = random.Random(1)
    values = [rng.gauss(0, 3) for _ in range(12)]
    values[4] = None  # unscorable: excluded from its group, stays None
    groups = [i // 4 for i in range(12)]  # three GRPO groups of 4
    got = group_win_rates(values, groups)
    for i, v in enumerate(values):
        if v is None:
            assert got[i] is None
            continue
        others = [values[j] for j in range(12) if groups[j] == groups[i] and j != i and values[j] is not None]
        want = sum(1 / (1 + math.exp(-(v - o))) for o in others) / len(others)
        assert got[i] == pytest.approx(want, abs=1e-12)
    # each group of k scored members sums to k/2 (every pair's two probabilities add to 1)
    for g in range(3):
        members = [got[i] for i in range(12) if groups[i] == g and got[i] is not None]
        assert sum(members) == pytest.approx(len(members) / 2)
    # an offset of the reward model changes nothing; a member alone gets 0.5
    assert group_win_rates([x + 7 if x is not None else None for x in values], groups) == pytest.approx(got)
    assert group_win_rates([1.0, 2.0], ["a", "b"]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="group key"):
        RewardShaper(ShapingConfig(group="bt_winrate"))([1.0, 2.0])
    with pytest.raises(ValueError, match=r"shaping\.group"):
        ShapingConfig(group="elo")  # type: ignore[arg-type]


def test_group_win_rates_through_the_reward_function_and_refused_by_the_server(reward_model) -> None:
    from worldpm_reward.errors import ConfigError
    from worldpm_reward.serving.protocol import RewardService
    from worldpm_reward.shaping import group_win_rates

    convs = real_conversations(12)
    other = next(c for c in convs if c[:-1] != convs[0][:-1])  # (hh-rlhf pairs share a prompt)
    prompts = [convs[0][:-1]] * 3 + [other[:-1]] * 3  # two groups of three completions
    samples = [
        {"messages": [*p, {"role": "assistant", "content": c[-1]["content"]}]} for p, c in zip(prompts, convs)
    ]
    fn = RewardFunction(reward_model, ShapingConfig(group="bt_winrate", clip_min=0.3))
    batch = fn(samples)
    raw = reward_model.score(samples)
    want = [max(0.3, w) for w in group_win_rates(raw, [0, 0, 0, 1, 1, 1])]  # type: ignore[arg-type]
    assert batch.rewards == pytest.approx(want, abs=1e-6)
    assert batch.raw == pytest.approx(raw, abs=1e-6)

    async def submit(s):  # never called
        raise AssertionError

    with pytest.raises(ConfigError, match="trainer side"):
        RewardService(submit, shaping=ShapingConfig(group="bt_winrate"))


def test_reference_relative_rewards_take_a_message_list_reference(reward_model: object) -> None:
    from worldpm_reward.rewards import RewardFunction

    fn = RewardFunction(reward_model, ShapingConfig(reference="difference"))
    base = {"prompt": "How do I sleep better?", "response": "Keep a regular schedule."}
    as_text = fn([{**base, "reference": "Go to bed at the same time."}])
    as_list = fn([{**base, "reference": [{"role": "assistant", "content": "Go to bed at the same time."}]}])
    assert as_list.rewards == as_text.rewards and as_text.rewards[0] is not None
    for mixed in (
        fn([{**base, "reference": [{"role": "assistant", "content": 3}]}, {**base, "reference": "ok"}]),
        fn(
            [base, base],
            references=[[{"role": "assistant", "content": 3}], [{"role": "user", "content": "ok"}]],
        ),
    ):
        assert mixed.rewards[0] is None and "reference[0].content" in (mixed.results[0].error or "")
        assert mixed.rewards[1] is not None  # its batch-mate is untouched
