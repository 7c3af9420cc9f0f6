"""Batch invariance, input order, per-sample errors, and the micro-batch planner."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from wpr_testutils import real_conversations

from worldpm_reward import BatchScoringError, RewardModel
from worldpm_reward.batching import padding_fraction, plan_batches


@pytest.fixture(scope="module")
def convs() -> list[list[dict[str, str]]]:
    return real_conversations(96)


@pytest.mark.slow
def test_sample_scores_the_same_alone_and_in_any_batch(tiny_worldpm, convs) -> None:
    alone_rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", max_batch_size=1)
    alone = [alone_rm.score([c])[0] for c in convs]
    rng = random.Random(0)
    for (budget, size), share in itertools.product(
        [(1_000_000, 64), (4096, 64), (2048, 7), (700, 3)], [True, False]
    ):
        rm = RewardModel.from_pretrained(
            tiny_worldpm,
            device="cpu",
            max_batch_tokens=budget,
            max_batch_size=size,
            shared_prefix=share,
            min_shared_prefix=32,
        )
        order = list(range(len(convs)))
        rng.shuffle(order)
        got = rm.score([convs[i] for i in order])
        worst = max(abs(got[k] - alone[i]) for k, i in enumerate(order))
        assert worst <= 1e-5, f"budget={budget} size={size} shared_prefix={share}: max drift {worst:.2e}"
        assert rm.last_stats.num_batches > 1


@pytest.mark.slow
def test_batches_really_mix_lengths_and_pack(tiny_worldpm, convs) -> None:
    """Invariance above is only meaningful if batches hold several lengths, several sequences
    per packed row. (Sharing off: hh-rlhf's chosen/rejected pairs share their prompt and would
    otherwise run as shared-prefix groups, which tests/engines/test_shared_prefix.py covers.)"""
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", shared_prefix=False)
    rm.score(convs)
    assert rm.last_stats.num_batches < len(convs) // 4
    assert rm.last_stats.num_rows < len(convs) // 2  # packed: rows hold several sequences
    assert rm.last_stats.padding_fraction < 0.05  # only the ends of rows are padding


def test_pad_id_equal_to_scored_token_does_not_shift_pooling(reward_model, convs) -> None:
    """The tiny tokenizer pads with <|endoftext|>, like Qwen's: the classic pitfall setup."""
    assert reward_model.engine.pad_token_id == 151643 == reward_model.encoder.final_token_id
    sample = [convs[0], convs[5]]
    ours = reward_model.score(sample)
    # The stock "last non-pad token" pooling lands on the token before <|endoftext|>.
    ids = [
        reward_model.encoder.encode(__import__("worldpm_reward").parse_sample(c)).input_ids for c in sample
    ]
    longest = max(map(len, ids))
    batch = torch.full((2, longest), 151643)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for r, x in enumerate(ids):
        batch[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    with torch.no_grad():
        hidden = reward_model.model.model(input_ids=batch, attention_mask=mask).last_hidden_state
        non_pad = (batch != 151643).long() * torch.arange(longest)
        stock = reward_model.model.score(hidden[torch.arange(2), non_pad.argmax(-1)]).squeeze(-1).tolist()
    assert all(abs(a - b) > 1e-3 for a, b in zip(ours, stock))


@pytest.mark.slow
def test_order_preserved_and_bad_samples_do_not_cost_others(reward_model, convs) -> None:
    good = convs[:10]
    expected = reward_model.score(good)
    mixed: list = list(good)
    mixed.insert(3, {"prompt": "hi", "response": ""})
    mixed.insert(7, [{"role": "user", "content": "no reply"}])
    mixed.append({"prompt": "hi", "response": 42})
    results = reward_model.score_detailed(mixed)
    assert len(results) == len(mixed)
    bad_positions = [i for i, r in enumerate(results) if r.error]
    assert bad_positions == [3, 7, 12]
    assert "sample 3" in results[3].error and "'response'" in results[3].error
    assert "sample 7" in results[7].error and "messages[0].role" in results[7].error
    assert "sample 12" in results[12].error and "expected a string, got int" in results[12].error
    got = [r.score for r in results if r.error is None]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5
    # all-or-nothing form raises, but keeps every other score in the exception
    with pytest.raises(BatchScoringError) as info:
        reward_model.score(mixed)
    assert [r.score is not None for r in info.value.results] == [r.error is None for r in results]
    assert "3 of 13 samples" in str(info.value)


def test_empty_batch(reward_model) -> None:
    assert reward_model.score([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_covers_each_index_once_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 3000) for _ in range(rng.randint(1, 300))]
    budget, size = rng.choice([512, 4096, 16384]), rng.choice([None, 1, 8, 64])
    pad = rng.choice([0.0, 0.05, 0.3, 1.0])
    batches = plan_batches(lengths, budget, size, pad)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert lengths[b[0]] == longest
        assert len(b) == 1 or len(b) * longest <= budget
        assert size is None or len(b) <= size
        assert len(b) == 1 or padding_fraction(lengths, [b]) <= pad + 1e-12
    assert 0.0 <= padding_fraction(lengths, batches) < 1.0


def test_plan_batches_sorting_keeps_padding_low() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(20, 2000) for _ in range(512)]
    planned = padding_fraction(lengths, plan_batches(lengths, 16384, 16, 0.05))
    static = padding_fraction(lengths, [list(range(i, min(i + 16, 512))) for i in range(0, 512, 16)])
    assert planned < 0.05 < static


@pytest.mark.parametrize("seed", range(5))
def test_plan_packed_covers_each_index_once_within_budget(seed: int) -> None:
    from worldpm_reward.batching import plan_packed, split_group

    rng = random.Random(seed)
    lengths = [rng.randint(1, 3000) for _ in range(rng.randint(1, 300))]
    counts = [rng.choice([1, 1, 1, 4]) for _ in lengths]
    budget, row, size = (
        rng.choice([512, 4096, 16384]),
        rng.choice([256, 512, 2048]),
        rng.choice([None, 4, 64]),
    )
    batches = plan_packed(lengths, budget, row, size, counts)
    assert sorted(i for b in batches for r in b for i in r) == list(range(len(lengths)))
    for b in batches:
        used = [sum(lengths[i] for i in r) for r in b]
        width = used[0]
        assert width == max(used)
        assert all(u <= max(row, max(lengths[i] for i in r)) for u, r in zip(used, b))  # rows fit
        assert len(b) == 1 or len(b) * width <= budget
        assert size is None or sum(counts[i] for r in b for i in r) <= max(size, max(counts))
    # rows end nearly full: short sequences fill the gaps of long ones
    short = [rng.randint(50, 400) for _ in range(200)]
    plan = plan_packed(short, 4096, 512)
    computed = sum(len(b) * sum(short[i] for i in b[0]) for b in plan)
    assert sum(short) / computed > 0.95
    # a group's suffixes: each chunk fits one row after its prefix, at most max_size suffixes
    chunks = split_group(300, [50, 200, 120, 80, 400], capacity=700, max_size=3)
    assert sorted(j for c in chunks for j in c) == list(range(5))
    assert all(
        len(c) <= 3 and (len(c) == 1 or 300 + sum([50, 200, 120, 80, 400][j] for j in c) <= 700)
        for c in chunks
    )
