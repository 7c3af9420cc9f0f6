"""Decoder sequence classifiers (the generic family) whose config changes what a forward call
computes: each is held to the model's own transformers class run on one sequence at a time,
in a freshly loaded model, whatever the engine batches, packs or scored before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worldpm_reward import RewardModel
from worldpm_reward.encoder import ChatTemplateEncoder
from worldpm_reward.errors import SampleError
from worldpm_reward.samples import parse_sample
from worldpm_reward.testing import qwen_tokenizer

CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
PAD = 151643  # <|endoftext|>


def _write(path: Path, arch: str, template: str = CHATML, **overrides: Any) -> Path:
    import transformers

    tok = qwen_tokenizer()
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=PAD,
    )
    fields.update(overrides)
    config = getattr(transformers, f"{arch}Config")(**fields)
    torch.manual_seed(3)
    model = getattr(transformers, f"{arch}ForSequenceClassification")(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def _conv(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _own_class(path: Path, convs: list[list[dict[str, str]]]) -> list[float]:
    """The model's own class on the rendered text, one sequence per freshly loaded model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for conv in convs:
        ids = tok(
            tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt"
        )
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            out.append(model(**ids).logits[0, 0].item())
    return out


SHORT_AND_LONG = [
    _conv("Tell me about the history of Paris in a few words please.", "It was founded by the Parisii."),
    _conv("2+2?", "4"),
    _conv("Name a colour.", "Blue, like the sky."),
    _conv("Tell me a story.", _words(60)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("window", "flag", "max_length", "packed"),
    [(8, None, None, False), (8, False, None, False), (64, None, 64, True)],
)
def test_a_sliding_window_is_honoured(
    tmp_path: Path, window: int, flag: bool | None, max_length: int | None, packed: bool
) -> None:
    """Mistral applies a set sliding_window in every layer, even beside a stray
    use_sliding_window=false. Samples longer than the window must not run packed rows (their
    block mask has no window: 0.45-0.63 off before), samples that fit in it may."""
    extra = {} if flag is None else {"use_sliding_window": flag}
    path = _write(tmp_path / "mistral", "Mistral", head_dim=16, sliding_window=window, **extra)
    convs = SHORT_AND_LONG[:3]
    rm = RewardModel.from_pretrained(path, device="cpu", max_length=max_length)
    ours = rm.score(convs)
    assert rm.last_stats.num_rows == (1 if packed else 0)  # packed rows, or padded micro-batches
    lengths = [len(rm.encoder.encode(parse_sample({"messages": c})).input_ids) for c in convs]
    assert (max(lengths) <= window) if packed else (max(lengths) > window)
    for got, want in zip(ours, _own_class(path, convs)):
        assert abs(got - want) <= 1e-4


ROPES = {
    # NTK scaling past 32 positions: rescaled by the longest position of a call, and kept
    "dynamic": dict(
        max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    ),
    # short factors up to 32 positions, long ones past them, chosen per call
    "longrope": dict(
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "short_factor": [1.0] * 8,
            "long_factor": [4.0] * 8,
        }
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_scaled_by_the_longest_position_scores_each_sample_alone(tmp_path: Path, rope: str) -> None:
    """transformers scales dynamic and LongRoPE frequencies by the longest position of a
    forward call, so batched short samples were rotated as the long one needed (up to 0.35
    off), and a dynamic model's score depended on what it had scored before (0.11 off)."""
    path = _write(tmp_path / rope, "Llama", **ROPES[rope])
    rm = RewardModel.from_pretrained(path, device="cpu", max_length=512)
    assert rm.engine.one_at_a_time is not None and rm.engine._packed_parts is None
    want = _own_class(path, SHORT_AND_LONG)
    lengths = [len(rm.encoder.encode(parse_sample({"messages": c})).input_ids) for c in SHORT_AND_LONG]
    assert min(lengths) < 32 < max(lengths)  # both sides of the trained context in one call
    for got, ref in zip(rm.score(SHORT_AND_LONG), want):
        assert abs(got - ref) <= 1e-4
    # the same samples again, in reverse, after the long one: nothing carried over
    for got, ref in zip(rm.score(SHORT_AND_LONG[::-1]), want[::-1]):
        assert abs(got - ref) <= 1e-4
    assert rm.engine.forward_ids(
        [rm.encoder.encode(parse_sample({"messages": SHORT_AND_LONG[1]})).input_ids]
    ) == [pytest.approx(want[1], abs=1e-4)]
    # within the trained context the same model may batch and pack as usual
    within = RewardModel.from_pretrained(path, device="cpu", max_length=32)
    assert within.engine.one_at_a_time is None and within.engine._packed_parts is not None


@pytest.mark.slow
def test_a_template_ending_with_the_pad_token_is_read_where_the_class_reads_it(tmp_path: Path) -> None:
    """A decoder classifier whose template ends with its pad id (pad = eos): transformers' class
    reads the last token that is not the pad id, and so must every engine (0.3 off before)."""
    path = _write(tmp_path / "padded", "Qwen2", template=CHATML + "<|endoftext|>")
    convs = SHORT_AND_LONG[:3]
    rm = RewardModel.from_pretrained(path, device="cpu")
    assert rm.encoder.encode(parse_sample({"messages": convs[1]})).input_ids[-1] != PAD
    for got, want in zip(rm.score(convs), _own_class(path, convs)):
        assert abs(got - want) <= 1e-4
    # a template that renders the pad id only leaves nothing to score: that sample's error
    encoder = ChatTemplateEncoder(
        rm.tokenizer, max_length=64, chat_template="<|endoftext|><|endoftext|>", scored_before=PAD
    )
    with pytest.raises(SampleError, match="pad tokens only"):
        encoder.encode(parse_sample({"messages": convs[1]}))
