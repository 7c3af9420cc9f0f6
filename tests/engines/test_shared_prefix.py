"""Shared-prefix scoring: a GRPO group's prompt runs once per packed row with the group's
replies after it (each reply attends to the prompt and to itself only), and every score
equals unshared scoring (and the independent model-card reference) within fp32 error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from wpr_testutils import ReferenceWorldPM

from worldpm_reward import RewardModel
from worldpm_reward.batching import plan_shared_prefixes
from worldpm_reward.config import ModelConfig
from worldpm_reward.testing import grpo_groups, write_tiny_polar

GROUPS = grpo_groups(n_prompts=3, group_size=6)


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_planner_groups_completions_of_each_prompt() -> None:
    system = [7] * 40
    p, q = list(range(100)), list(range(1000, 1100))
    seqs = [system + p + [1, 2, 3], system + p + [1, 2, 4, 5], system + p + [9], system + q + [1]]
    seqs += [system + q + [2, 2], [5, 5, 5], system + p + [1, 2, 3]]
    assert plan_shared_prefixes(seqs, min_prefix=32) == [(140, [0, 6, 1, 2]), (140, [3, 4])]
    # prompts that share only a system message: one group over the system message if that skips more
    assert plan_shared_prefixes([[*system, 1], [*system, 2], [*system, 3]], 32) == [(40, [0, 1, 2])]
    assert plan_shared_prefixes([system + p + [1], system + p + [2], system + q + [3]], 32) == [(140, [0, 1])]
    # identical sequences keep their own last token; short prefixes are not worth it
    assert plan_shared_prefixes([[1] * 50, [1] * 50], 32) == [(49, [0, 1])]
    assert plan_shared_prefixes([[1] * 20 + [2], [1] * 20 + [3]], 32) == []
    with pytest.raises(ValueError):
        plan_shared_prefixes(seqs, min_prefix=0)


@pytest.mark.slow
def test_grpo_groups_score_as_unshared_and_as_the_reference(tiny_worldpm: Path) -> None:
    shared = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32)
    plain = RewardModel.from_pretrained(tiny_worldpm, device="cpu", shared_prefix=False)
    got = shared.score(GROUPS)
    stats = shared.last_stats
    want = plain.score(GROUPS)
    assert stats.shared_groups == 3 and stats.shared_prefix_tokens > 0.7 * stats.real_tokens
    assert plain.last_stats.shared_groups == 0
    assert _max_diff(got, want) <= 1e-4
    ref = ReferenceWorldPM(tiny_worldpm)
    convs = [
        [{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["response"]}]
        for s in GROUPS
    ]
    assert _max_diff(got[::4], [ref.score(c) for c in convs[::4]]) <= 1e-4
    # batch invariance: alone (nothing to share) == in its group
    assert _max_diff([shared.score([s])[0] for s in GROUPS[::5]], got[::5]) <= 1e-5
    assert len(set(got)) == len(got)  # different replies, different scores


@pytest.mark.slow
def test_micro_batches_and_truncation_keep_the_same_scores(tiny_worldpm: Path) -> None:
    # a tiny token budget splits every group into several suffix micro-batches
    small = RewardModel.from_pretrained(
        tiny_worldpm, device="cpu", min_shared_prefix=32, max_batch_tokens=700
    )
    plain = RewardModel.from_pretrained(tiny_worldpm, device="cpu", shared_prefix=False)
    assert _max_diff(small.score(GROUPS), plain.score(GROUPS)) <= 1e-4
    assert small.last_stats.shared_groups == 3 and small.last_stats.num_batches > 3
    # truncation cuts the START: replies of different lengths lose different amounts, and
    # every sample still scores exactly as unshared, with the same truncation report
    cut = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32, max_length=200)
    cut_plain = RewardModel.from_pretrained(tiny_worldpm, device="cpu", max_length=200, shared_prefix=False)
    a, b = cut.score_detailed(GROUPS), cut_plain.score_detailed(GROUPS)
    assert _max_diff([r.score for r in a], [r.score for r in b]) <= 1e-4
    assert [(r.truncated, r.num_truncated_tokens, r.response_truncated) for r in a] == [
        (r.truncated, r.num_truncated_tokens, r.response_truncated) for r in b
    ]
    assert any(r.truncated for r in a)


@pytest.mark.slow
def test_bad_samples_and_out_of_memory_fall_back(tiny_worldpm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32)
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu", shared_prefix=False).score(GROUPS)
    mixed = [*GROUPS[:6], {"prompt": GROUPS[0]["prompt"], "response": ""}, *GROUPS[6:]]
    results = rm.score_detailed(mixed)
    assert results[6].error is not None and "response" in results[6].error
    assert _max_diff([r.score for r in results if r.ok], want) <= 1e-4

    engine = rm.engine
    real = engine._score_packed  # every packed forward (fused, compiled or transformers') goes through it

    def oom_if(condition):  # a packed forward that runs out of memory when `condition(batch)`
        def run(batch):
            if condition(batch):
                raise torch.OutOfMemoryError("simulated")
            return real(batch)

        return run

    # any row holding a shared prefix: every group ends up scored unshared, one sample at a time
    monkeypatch.setattr(engine, "_score_packed", oom_if(lambda b: bool((b.parents >= 0).any())))
    assert _max_diff(rm.score(GROUPS), want) <= 1e-4
    assert rm.last_stats.shared_prefix_tokens == 0
    # more than 3 sequences per micro-batch: halved until they fit, sharing kept where it fits
    monkeypatch.setattr(engine, "_score_packed", oom_if(lambda b: len(b.keys) > 3))
    assert _max_diff(rm.score(GROUPS), want) <= 1e-4
    assert rm.last_stats.shared_prefix_tokens > 0 and rm.last_stats.num_batches >= len(GROUPS) // 3
    # a sample that does not fit alone: its own error, the others scored
    sizes = [r.num_tokens for r in rm.score_detailed(GROUPS)]
    longest = max(range(len(GROUPS)), key=lambda i: sizes[i])
    n = sizes[longest]
    assert sorted(sizes)[-2] < n
    monkeypatch.setattr(engine, "_score_packed", oom_if(lambda b: int(b.input_ids.shape[1]) >= n))
    results = rm.score_detailed(GROUPS)
    assert (
        "out of device memory" in (results[longest].error or "")
        and f"sample {longest}" in results[longest].error
    )
    assert (
        _max_diff(
            [r.score for i, r in enumerate(results) if i != longest],
            [w for i, w in enumerate(want) if i != longest],
        )
        <= 1e-4
    )


@pytest.mark.slow
def test_polar_groups_share_their_prefix(tmp_path: Path) -> None:
    path = write_tiny_polar(tmp_path / "polar", seed=5)
    samples = [{**s, "reference": "A careful, complete answer to the question."} for s in GROUPS]
    shared = RewardModel.from_pretrained(path, device="cpu", min_shared_prefix=32)
    got = shared.score(samples)
    assert shared.last_stats.shared_groups == 3
    want = RewardModel.from_pretrained(path, device="cpu", shared_prefix=False).score(samples)
    assert _max_diff(got, want) <= 1e-4


@pytest.mark.slow
def test_group_size_threshold(tiny_worldpm: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32, min_shared_group=7)
    assert rm.engine.min_shared_group == 7
    got = rm.score(GROUPS)  # groups of 6: below the threshold, nothing shared
    assert rm.last_stats.shared_groups == 0
    assert (
        _max_diff(
            got, RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32).score(GROUPS)
        )
        <= 1e-4
    )
    assert (
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32).engine.min_shared_group
        == 2
    )  # CPU default


@pytest.mark.slow
def test_server_shares_prefixes_across_one_sample_requests(tiny_worldpm: Path) -> None:
    """OpenRLHF sends one sample per request: the server's batch still shares the group's prompt."""
    # the co-installation run inside veRL's environment installs the client extra, not the server
    pytest.importorskip("fastapi", reason="the reward server needs the serve extra (fastapi)")
    import asyncio

    import httpx
    from wpr_servers import server_thread

    from worldpm_reward.serving import ServerConfig, create_app

    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32)
    want = RewardModel.from_pretrained(tiny_worldpm, device="cpu", shared_prefix=False).score(GROUPS)
    shared_groups: list[int] = []

    class Recording:  # the stats of every batch the server runs
        def score_detailed(self, samples: list) -> list:
            out = rm.score_detailed(samples)
            shared_groups.append(rm.last_stats.shared_groups)
            return out

    app = create_app(Recording(), ServerConfig(max_wait_ms=500, max_batch_samples=64))

    async def send(url: str) -> list[float]:
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(
                *(client.post(f"{url}/v1/score", json={"samples": [s]}) for s in GROUPS)
            )
        return [r.json()["results"][0]["score"] for r in rs]

    with server_thread(app) as url:
        got = asyncio.run(send(url))
    assert _max_diff(got, want) <= 1e-4
    assert sum(shared_groups) >= 1 and len(shared_groups) < len(GROUPS)  # batched, and shared


def test_sharing_is_on_only_where_it_pays() -> None:
    """The automatic prefix bound: 32 tokens for a real-sized model, but a toy model (hidden 32)
    gets one no prefix reaches, because each token it skips saves less than a forward call costs."""
    from transformers import Qwen2Config, Qwen2Model

    from worldpm_reward.engines.transformers import auto_min_shared_prefix
    from worldpm_reward.testing import QWEN2_DIMENSIONS

    tiny = Qwen2Model(Qwen2Config(vocab_size=64, **QWEN2_DIMENSIONS["tiny"]))
    small = Qwen2Model(Qwen2Config(vocab_size=64, **QWEN2_DIMENSIONS["small"]))
    assert auto_min_shared_prefix(tiny, on_gpu=False) > 4096
    assert auto_min_shared_prefix(small, on_gpu=False) == 32


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["segments", "sdpa", "eager"])
def test_packed_rows_match_the_card_path_with_each_attention(tiny_worldpm: Path, attention: str) -> None:
    """Packed rows (unshared conversations, and shared-prefix groups) under each attention the
    engine runs them with: per-segment sdpa (an sdpa model the engine loads on CPU), and the
    whole row under a block mask, boolean for sdpa (a model handed to from_model keeps its
    attention) or additive for eager attention."""
    from wpr_testutils import real_conversations

    from worldpm_reward.families import load
    from worldpm_reward.packing import SEGMENT_ATTENTION

    if attention == "sdpa":
        loaded = load(tiny_worldpm, ModelConfig(device="cpu"))
        rm = RewardModel.from_model(
            loaded.model, loaded.tokenizer, family=loaded.family, min_shared_prefix=32
        )
    else:
        rm = RewardModel.from_pretrained(
            tiny_worldpm,
            device="cpu",
            attn_implementation="sdpa" if attention == "segments" else attention,
            min_shared_prefix=32,
        )
    expected = SEGMENT_ATTENTION if attention == "segments" else attention
    assert rm.model.config._attn_implementation == expected
    assert rm.engine.segment_attention == (attention == "segments")
    ref = ReferenceWorldPM(tiny_worldpm)
    convs = real_conversations(24)
    got = rm.score(convs)
    assert rm.last_stats.num_rows < len(convs) // 2  # several conversations per row
    assert _max_diff(got, [ref.score(c) for c in convs]) <= 1e-4
    grouped = rm.score(GROUPS)
    assert rm.last_stats.shared_groups == 3
    by_hand = [
        [{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["response"]}]
        for s in GROUPS
    ]
    assert _max_diff(grouped[::3], [ref.score(c) for c in by_hand[::3]]) <= 1e-4
