"""Checkpoints load faithfully or are refused loudly, naming the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worldpm_reward import CheckpointError, RewardModel
from worldpm_reward.testing import qwen_tokenizer, tiny_qwen2_config, write_tiny_worldpm


@pytest.mark.slow
def test_loads_worldpm_layout_without_remote_code(tiny_worldpm: Path) -> None:
    cfg = json.loads((tiny_worldpm / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForRewardModel"] and "auto_map" in cfg
    assert not list(tiny_worldpm.glob("*.py")), "no remote code ships with the checkpoint"
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    assert rm.family == "worldpm"
    assert next(rm.model.parameters()).dtype == torch.float32  # CPU default
    assert isinstance(rm.model.score[0], torch.nn.Linear) and rm.model.score[0].out_features == 32
    assert isinstance(rm.model.score[1], torch.nn.ReLU)
    assert rm.model.score[2].out_features == 1


@pytest.mark.parametrize(
    ("head", "must_name"),
    [
        (
            "single_linear",
            [
                "score.weight",
                "score.0.weight",
                "score.0.bias",
                "score.2.weight",
                "score.2.bias",
                "single-Linear",
            ],
        ),
        ("missing_head", ["score.0.weight", "score.2.bias"]),
        ("missing_bias", ["score.2.bias"]),
        ("extra_weight", ["score.3.weight"]),
    ],
)
def test_broken_heads_are_refused_naming_the_weights(tmp_path: Path, head: str, must_name: list[str]) -> None:
    path = write_tiny_worldpm(tmp_path / head, head=head)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError) as info:
        RewardModel.from_pretrained(path, device="cpu")
    for name in must_name:
        assert name in str(info.value)


def test_bin_checkpoint_with_stock_head_is_refused_after_loading(tmp_path: Path, tiny_worldpm: Path) -> None:
    """No safetensors to pre-check: transformers' own loading report must still stop it."""
    from safetensors.torch import load_file

    path = tmp_path / "bin"
    path.mkdir()
    for f in tiny_worldpm.iterdir():
        if f.name != "model.safetensors":
            (path / f.name).write_bytes(f.read_bytes())
    weights = {
        k: v
        for k, v in load_file(str(tiny_worldpm / "model.safetensors")).items()
        if not k.startswith("score.")
    }
    weights["score.weight"] = torch.zeros(1, 32)
    torch.save(weights, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"score\.0\.weight"):
        RewardModel.from_pretrained(path, device="cpu")


@pytest.mark.slow
def test_sharded_checkpoint_scores_like_the_single_file(tmp_path: Path, tiny_worldpm: Path) -> None:
    sharded = write_tiny_worldpm(tmp_path / "sharded", seed=0, max_shard_size="5MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    conv = [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]
    a, b = (
        RewardModel.from_pretrained(sharded, device="cpu"),
        RewardModel.from_pretrained(tiny_worldpm, device="cpu"),
    )
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert abs(a.score([conv])[0] - b.score([conv])[0]) <= 1e-6


@pytest.mark.slow
def test_lm_head_weights_are_ignored(tmp_path: Path, tiny_worldpm: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "with-lm-head"
    path.mkdir()
    for f in tiny_worldpm.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"] = torch.zeros(151936, 32)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_lm = RewardModel.from_pretrained(path, device="cpu").score([conv])[0]
    assert abs(with_lm - RewardModel.from_pretrained(tiny_worldpm, device="cpu").score([conv])[0]) <= 1e-6


def test_wrong_family_override_is_refused(tiny_worldpm: Path) -> None:
    """Forcing WorldPM through the stock sequence-classification class must not load silently."""
    with pytest.raises(CheckpointError, match="not a sequence-classification reward model"):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", family="generic")


def _write_generic(path: Path, num_labels: int = 1, drop_head: bool = False) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2ForSequenceClassification

    config = tiny_qwen2_config(num_labels=num_labels, pad_token_id=151643)
    torch.manual_seed(3)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    if drop_head:
        w = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("score")}
        save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok = qwen_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_generic_sequence_classification_reward_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _write_generic(tmp_path / "generic")
    rm = RewardModel.from_pretrained(path, device="cpu")
    assert rm.family == "generic" and rm.encoder.final_token_id is None
    convs = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, how can I help?"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
    ]
    ours = rm.score(convs)
    assert rm.last_stats.num_rows == 1  # a decoder classifier runs packed rows too
    # Reference: transformers' own class, one sample at a time (no padding, so its pooling is right).
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    for conv, got in zip(convs, ours):
        ids = tok(
            tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            want = model(**ids).logits[0, 0].item()
        assert abs(got - want) <= 1e-4


@pytest.mark.slow
def test_generic_checks(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="num_labels=2"):
        RewardModel.from_pretrained(_write_generic(tmp_path / "two", num_labels=2), device="cpu")
    with pytest.raises(CheckpointError, match=r"score\.weight"):
        RewardModel.from_pretrained(_write_generic(tmp_path / "nohead", drop_head=True), device="cpu")


def test_polar_is_recognised_not_misloaded(tmp_path: Path) -> None:
    from worldpm_reward.families import detect_family

    assert detect_family({"architectures": ["InternLM2ForRewardModel"]}) == "polar"
    assert detect_family({"architectures": ["Qwen2ForRewardModel"]}) == "worldpm"
    assert detect_family({"architectures": ["LlamaForSequenceClassification"]}) == "generic"
    config = {"architectures": ["InternLM2ForRewardModel"], "model_type": "internlm2"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors / pytorch_model\.bin"):
        RewardModel.from_pretrained(tmp_path, device="cpu")


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        RewardModel.from_pretrained(tmp_path / "nope", device="cpu")


def test_bad_options_are_named(tiny_worldpm: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="family"):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", family="llama")


@pytest.mark.slow
def test_a_saved_worldpm_model_loads_back_and_scores_the_same(tmp_path: Path, tiny_worldpm: Path) -> None:
    """``save_pretrained`` of the loaded model names the saving class in ``architectures``
    (WorldPMForRewardModel); that checkpoint is WorldPM's layout and loads back as WorldPM."""
    from worldpm_reward.testing import real_conversations

    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    saved = tmp_path / "saved"
    rm.model.save_pretrained(saved)
    rm.tokenizer.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["WorldPMForRewardModel"]
    back = RewardModel.from_pretrained(saved, device="cpu")
    assert back.family == "worldpm"
    sa, sb = rm.model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    samples = [{"messages": c} for c in real_conversations(6)]
    theirs, ours = back.score(samples), rm.score(samples)
    assert len({round(s, 4) for s in ours}) == len(ours)  # distinct scores: a comparison that can fail
    assert max(abs(a - b) for a, b in zip(theirs, ours)) <= 1e-6
