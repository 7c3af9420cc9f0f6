"""The fused CPU forward (worldpm_reward.fused) against each backbone's own transformers forward,
run on every sequence alone: Qwen2 (q/k/v biases), Llama (attention and MLP biases), Mistral,
Qwen3 (per-head q/k norms, a head_dim of its own), with grouped-query attention, shared
prefixes, lone sequences and end-of-row padding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worldpm_reward import RewardModel
from worldpm_reward.config import ModelConfig
from worldpm_reward.engines.transformers import auto_cpu_batch_tokens
from worldpm_reward.families import load
from worldpm_reward.fused import FusedDecoder, fused_support
from worldpm_reward.packing import Block, pack
from worldpm_reward.testing import QWEN2_DIMENSIONS

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def _backbone(kind: str) -> torch.nn.Module:
    from transformers import AutoModel, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    config = {
        "qwen2": lambda: Qwen2Config(**COMMON),
        "llama": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    }[kind]()
    config._attn_implementation = "sdpa"
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():  # random biases and norm weights, so that every one of them counts
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# row 0: a prefix of 20 with three suffixes (one of a single token), then a lone sequence;
# row 1: one lone sequence, shorter than row 0 (end-of-row padding)
PREFIX = _ids(20, 1)
ROWS = [
    [
        Block(PREFIX, [(0, _ids(5, 2)), (1, _ids(9, 3)), (2, _ids(1, 4))]),
        Block([], [(3, _ids(7, 5))]),
    ],
    [Block([], [(4, _ids(30, 6))])],
]
FULL = {0: PREFIX + _ids(5, 2), 1: PREFIX + _ids(9, 3), 2: PREFIX + _ids(1, 4), 3: _ids(7, 5), 4: _ids(30, 6)}


@pytest.mark.parametrize("kind", ["qwen2", "llama", "mistral", "qwen3"])
def test_fused_hidden_states_are_each_sequence_run_alone(kind: str) -> None:
    backbone = _backbone(kind)
    with torch.inference_mode():
        alone = {
            k: backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for k, ids in FULL.items()
        }
    assert fused_support(backbone) is None
    batch = pack(ROWS, pad_token_id=0)
    assert batch.input_ids.shape[0] == 2 and batch.real_tokens < batch.input_ids.numel()  # padding
    got = FusedDecoder(backbone).hidden_at_scores(batch, torch.device("cpu"))
    want = torch.stack([alone[k] for k in batch.keys])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # able to fail: the same rows with a suffix's prefix dropped differ
    assert not torch.allclose(
        alone[0], backbone(input_ids=torch.tensor([_ids(5, 2)])).last_hidden_state[0, -1]
    )


def test_fusing_keeps_the_models_own_weights_and_forward() -> None:
    backbone = _backbone("qwen2")
    ids = torch.tensor([_ids(12, 7)])
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    with torch.inference_mode():
        out_before = backbone(input_ids=ids).last_hidden_state
    fused = FusedDecoder(backbone)
    for name, p in backbone.named_parameters():
        assert torch.equal(p, before[name]), name
    layer, attn = fused.layers[0], backbone.layers[0].self_attn
    storage = layer.qkv_weight.untyped_storage().data_ptr()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # stored once, in the fused matrix
        assert proj.weight.untyped_storage().data_ptr() == storage
    with torch.inference_mode():
        assert torch.equal(backbone(input_ids=ids).last_hidden_state, out_before)


def test_what_the_fused_forward_refuses() -> None:
    assert "dtype" in (fused_support(_backbone("qwen2").to(torch.bfloat16)) or "")
    from transformers import AutoModel, Qwen2Config

    gelu = AutoModel.from_config(Qwen2Config(**COMMON, hidden_act="gelu"))
    assert "hidden_act" in (fused_support(gelu) or "")
    assert "model_type" in (fused_support(SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))) or "")
    with pytest.raises(ValueError, match="hidden_act"):
        FusedDecoder(gelu)


def test_the_engine_fuses_the_float32_models_it_loads(tiny_worldpm: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    assert rm.engine.fused is not None and rm.engine.fused_off is None
    half = RewardModel.from_pretrained(tiny_worldpm, device="cpu", dtype="bf16")
    assert half.engine.fused is None and "dtype" in half.engine.fused_off
    loaded = load(tiny_worldpm, ModelConfig(device="cpu"))
    theirs = RewardModel.from_model(loaded.model, loaded.tokenizer, family=loaded.family)
    assert theirs.engine.fused is None  # a user's model keeps its own forward
    samples = [
        {"prompt": "What is 2 + 2?", "response": "4"},
        {"prompt": "Name a color.", "response": "Teal."},
    ]
    a, b = rm.score(samples), theirs.score(samples)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_a_reused_activation_sizes_the_cpu_budget_by_its_buffer() -> None:
    def model(size: str) -> SimpleNamespace:
        return SimpleNamespace(
            config=SimpleNamespace(**QWEN2_DIMENSIONS[size]), parameters=lambda: iter([torch.zeros(1)])
        )

    assert auto_cpu_batch_tokens(model("0.5b")) == 1024  # 20 MiB of MLP activation
    # the fused forward's gate/up buffer (tokens x 2 x intermediate x 4 bytes) within 512 MiB
    assert auto_cpu_batch_tokens(model("0.5b"), reused_activation=True) == 4096
    assert auto_cpu_batch_tokens(model("7b"), reused_activation=True) == 2048
