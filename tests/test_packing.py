"""worldpm_reward.packing: per-segment attention of packed rows against an independent masked
softmax, and the models the engine gives it still answering every other caller as sdpa."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worldpm_reward import RewardModel
from worldpm_reward.config import ModelConfig
from worldpm_reward.engines.transformers import auto_cpu_batch_tokens
from worldpm_reward.families import load
from worldpm_reward.packing import (
    SEGMENT_ATTENTION,
    Block,
    block_mask,
    pack,
    register_segment_attention,
    segment_attention,
)
from worldpm_reward.testing import QWEN2_DIMENSIONS

#: two rows: a shared prefix with three suffixes then a lone sequence; two lone sequences and padding
ROWS = [
    [Block(list(range(7)), [(0, [1, 2, 3]), (1, [4]), (2, [5, 6, 7, 8, 9])]), Block((), [(3, [1, 2, 3, 4])])],
    [Block((), [(4, [9, 8, 7, 6, 5, 4])]), Block((), [(5, [3, 2])])],
]


def _reference_attention(q, k, v, allowed, scale):  # type: ignore[no-untyped-def]
    """softmax(q k^T * scale, masked) v, written out, key/value heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def test_segment_attention_is_the_block_masked_softmax() -> None:
    batch = pack(ROWS, pad_token_id=0)
    rows, width = batch.input_ids.shape
    assert [len(r) for r in batch.spans] == [5, 2] and batch.spans[0][:2] == [(0, 7, 0, 0), (7, 10, 0, 7)]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, width, 8, generator=gen)
    k = torch.randn(rows, 2, width, 8, generator=gen)
    v = torch.randn(rows, 2, width, 8, generator=gen)
    scale = 1 / math.sqrt(8)
    got, weights = segment_attention(
        SimpleNamespace(), q, k, v, None, scaling=scale, worldpm_spans=batch.spans
    )
    assert weights is None and got.shape == (rows, width, 4, 8)
    allowed = block_mask(batch.segments, batch.parents, "sdpa", torch.float32)
    want = _reference_attention(q, k, v, allowed, scale).transpose(1, 2)
    real = batch.segments >= 0
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert not real.all() and torch.count_nonzero(got[~real]) == 0  # padding: zeros, never read


def test_without_spans_it_is_transformers_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 6, 8, generator=gen) for h in (4, 2, 2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[0, :, :, :2] = False  # left padding in the first row
    mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    got, _ = segment_attention(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert torch.equal(got, want)


def test_a_row_of_spans_that_does_not_fit_the_batch_is_refused() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="worldpm_spans covers 2 rows"):
        segment_attention(SimpleNamespace(), q, q, q, None, worldpm_spans=[[(0, 4, 0, 0)], [(0, 4, 0, 0)]])


def test_the_engines_model_answers_other_callers_as_sdpa(tiny_worldpm: Path) -> None:
    """The engine sets SEGMENT_ATTENTION on a model it loads; the model card's own call (a
    left-padded batch under a 2-D mask) must still get sdpa with that mask, as a plain copy
    of the model does."""
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    assert rm.model.config._attn_implementation == SEGMENT_ATTENTION == register_segment_attention()
    plain = load(tiny_worldpm, ModelConfig(device="cpu", attn_implementation="sdpa")).model
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.tensor([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        got = rm.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = plain.model(input_ids=ids).last_hidden_state
    assert torch.allclose(got[:, -1], want[:, -1], atol=1e-5)
    assert not torch.allclose(got[0, -1], unmasked[0, -1], atol=1e-3)  # the mask mattered


@pytest.mark.parametrize(
    ("dims", "dtype", "tokens"),
    [
        (QWEN2_DIMENSIONS["0.5b"], torch.float32, 1024),
        (QWEN2_DIMENSIONS["0.5b"], torch.bfloat16, 2048),
        (QWEN2_DIMENSIONS["7b"], torch.float32, 256),
        ({"hidden_size": 32, "intermediate_size": 64}, torch.float32, 4096),
    ],
)
def test_cpu_micro_batches_keep_the_mlp_activation_small(dims: dict, dtype: torch.dtype, tokens: int) -> None:
    model = SimpleNamespace(
        config=SimpleNamespace(**dims), parameters=lambda: iter([torch.zeros(1, dtype=dtype)])
    )
    got = auto_cpu_batch_tokens(model)
    assert got == tokens
    activation = got * dims["intermediate_size"] * (2 if dtype == torch.bfloat16 else 4)
    assert got == 4096 or activation <= 20 << 20 < 2 * activation
