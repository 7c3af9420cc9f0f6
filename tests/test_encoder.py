"""Input validation, WorldPM's input format, and truncation."""

from __future__ import annotations

import pytest

from worldpm_reward import RewardModel, SampleError, parse_sample
from worldpm_reward.encoder import ChatTemplateEncoder
from worldpm_reward.testing import QWEN2_CHAT_TEMPLATE, QWEN2_CHAT_TEMPLATE_WITH_EOS, qwen_tokenizer

CONV = [
    {"role": "user", "content": "Tips for better sleep?"},
    {"role": "assistant", "content": "Keep a schedule."},
]


@pytest.mark.parametrize(
    ("sample", "field", "says"),
    [
        ("just a string", "messages", "expected a list"),
        ([], "messages", "at least one message"),
        ([{"role": "user", "content": "hi"}], "messages[0].role", "last message must be the assistant"),
        ([{"role": "bot", "content": "hi"}], "messages[0].role", "role must be one of"),
        (
            [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}],
            "messages[0].content",
            "expected a string",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            "messages[1].content",
            "must not be empty",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": ""},
                {"role": "assistant", "content": "x"},
            ],
            "messages[1].role",
            "first message",
        ),
        (["not a dict", {"role": "assistant", "content": "x"}], "messages[0]", "expected a mapping"),
        ({"prompt": "hi"}, "response", "missing"),
        ({"response": "hi"}, "prompt", "missing"),
        ({"prompt": "", "response": "x"}, "prompt", "must not be empty"),
        (
            {
                "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "response": "c",
            },
            "prompt[1].role",
            "must not end with an assistant",
        ),
        ({"prompt": "a", "response": "b", "reference": 1}, "reference", "expected a string"),
        ({"text": "a"}, "messages", "needs 'messages' or 'prompt'"),
    ],
)
def test_bad_samples_name_index_and_field(sample, field: str, says: str) -> None:
    with pytest.raises(SampleError) as info:
        parse_sample(sample, index=7)
    assert info.value.index == 7 and info.value.field == field
    assert f"sample 7, field '{field}'" in str(info.value) and says in str(info.value)


def test_prompt_forms_are_equivalent() -> None:
    as_messages = parse_sample(CONV)
    assert parse_sample({"messages": CONV}) == as_messages
    assert parse_sample({"prompt": "Tips for better sleep?", "response": "Keep a schedule."}) == as_messages
    assert parse_sample({"prompt": CONV[:1], "response": "Keep a schedule."}) == as_messages
    assert parse_sample({"prompt": "p", "response": "r", "reference": "ref"}).reference == "ref"


def test_user_system_message_is_kept(reward_model) -> None:
    text = reward_model.encoder.render(parse_sample([{"role": "system", "content": "Be kind."}, *CONV]))
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|im_start|>system") == 1


@pytest.mark.slow
@pytest.mark.parametrize("template", [QWEN2_CHAT_TEMPLATE, QWEN2_CHAT_TEMPLATE_WITH_EOS])
def test_endoftext_exactly_once(template: str) -> None:
    enc = ChatTemplateEncoder(
        qwen_tokenizer(template), max_length=512, ensure_system=True, final_token="<|endoftext|>"
    )
    ids = enc.encode(parse_sample(CONV)).input_ids
    assert ids.count(151643) == 1 and ids[-1] == 151643 and ids[-2] == 198  # "\n" after <|im_end|>


@pytest.mark.slow
def test_missing_final_token_is_refused() -> None:
    from worldpm_reward import CheckpointError

    with pytest.raises(CheckpointError, match="<\\|reward\\|>"):
        ChatTemplateEncoder(qwen_tokenizer(), max_length=64, final_token="<|reward|>")


def test_truncation_keeps_the_end_and_reports(reward_model) -> None:
    long_prompt = "word " * 400
    conv = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Short reply."}]
    full = reward_model.encoder.encode(parse_sample(conv)).input_ids
    enc = ChatTemplateEncoder(
        reward_model.tokenizer, max_length=64, ensure_system=True, final_token="<|endoftext|>"
    )
    cut = enc.encode(parse_sample(conv))
    assert len(cut.input_ids) == 64 and cut.input_ids == full[-64:]
    assert cut.truncated and cut.num_truncated_tokens == len(full) - 64 and not cut.response_truncated

    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "blah " * 200}]
    cut = enc.encode(parse_sample(long_reply))
    assert cut.input_ids[-1] == 151643 and cut.response_truncated

    # a reply whose text also occurs in the markup after it ("e" in <|im_end|>): a cut that
    # reaches past the prompt still reaches into the reply
    for reply in ("e", "end", "The end"):
        short = [
            {"role": "user", "content": "Which option? d) four e) five"},
            {"role": "assistant", "content": reply},
        ]
        ids = reward_model.encoder.encode(parse_sample(short)).input_ids
        before = len(
            reward_model.encoder.encode(
                parse_sample([*short[:1], {"role": "assistant", "content": "x"}])
            ).input_ids
        )
        cut_all = ChatTemplateEncoder(
            reward_model.tokenizer,
            max_length=len(ids) - (before - 3),
            ensure_system=True,
            final_token="<|endoftext|>",
        ).encode(parse_sample(short))
        assert cut_all.num_truncated_tokens == before - 3 and cut_all.response_truncated, reply

    strict = ChatTemplateEncoder(
        reward_model.tokenizer,
        max_length=64,
        ensure_system=True,
        final_token="<|endoftext|>",
        overflow="error",
    )
    out = strict.encode_batch([parse_sample(conv)], [4])[0]
    assert isinstance(out, SampleError) and "sample 4" in str(out) and "max_length=64" in str(out)


@pytest.mark.slow
def test_truncated_samples_are_scored_and_flagged(tiny_worldpm) -> None:
    rm = RewardModel.from_pretrained(tiny_worldpm, device="cpu", max_length=48)
    conv = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "Short reply."}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Short reply."}]
    r_long, r_short = rm.score_detailed([conv, short])
    assert r_long.ok and r_long.truncated and r_long.num_tokens == 48 and r_long.num_truncated_tokens > 0
    assert r_short.ok and not r_short.truncated
    assert rm.last_stats.num_truncated == 1
    # a truncated sample still scores the same alone (same kept tokens)
    assert abs(rm.score([conv])[0] - r_long.score) <= 1e-5

    strict = RewardModel.from_pretrained(tiny_worldpm, device="cpu", max_length=48, overflow="error")
    r_long, r_short = strict.score_detailed([conv, short])
    assert not r_long.ok and "max_length=48" in r_long.error and r_short.ok


def test_lone_surrogates_and_tokenizer_failures_stay_with_their_sample(reward_model) -> None:
    """A lone UTF-16 surrogate (valid JSON, invalid Unicode) is that sample's error; the
    batch-mates keep their scores, and a tokenizer that refuses one text costs only that text."""
    good = {"prompt": "Tips for better sleep?", "response": "Keep a schedule."}
    bad = {"prompt": "q", "response": "x\ud800"}
    results = reward_model.score_detailed([good, bad, good])
    # the same sample at two batch positions: equal within float rounding (kernels differ by row)
    assert results[0].ok and results[2].ok and abs(results[0].score - results[2].score) <= 1e-6
    assert (
        results[1].error is not None and "sample 1" in results[1].error and "'response'" in results[1].error
    )
    assert "surrogate" in results[1].error
    with pytest.raises(SampleError, match="surrogate"):
        parse_sample([{"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "ok"}], 0)

    enc = reward_model.encoder
    real = enc.tokenizer

    class Refusing:
        """The real tokenizer, refusing any text containing 'REFUSE' (as a tokenizer may on odd input)."""

        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, text, **kw):
            texts = text if isinstance(text, list) else [text]
            if any("REFUSE" in t for t in texts):
                raise ValueError("cannot tokenize")
            return real(text, **kw)

    enc.tokenizer = Refusing()
    try:
        mixed = reward_model.score_detailed([good, {"prompt": "REFUSE", "response": "y"}, good])
    finally:
        enc.tokenizer = real
    assert mixed[0].ok and mixed[2].ok and abs(mixed[0].score - results[0].score) <= 1e-6
    assert "tokenizer failed" in (mixed[1].error or "") and "sample 1" in (mixed[1].error or "")


@pytest.mark.slow
def test_strip_think_scores_the_answer_without_its_reasoning(tiny_worldpm) -> None:
    from worldpm_reward import RewardModel
    from worldpm_reward.cli import build_parser
    from worldpm_reward.policy_text import strip_reasoning

    assert strip_reasoning("<think>plan a, b</think>\n\nThe answer is 4.") == "The answer is 4."
    assert (
        strip_reasoning("plan; the template opened the block</think>The answer is 4.") == "The answer is 4."
    )
    assert strip_reasoning("<think>a</think>x<think>b</think>y") == "xy"
    assert strip_reasoning("Answer first. <think>cut off by the length lim") == "Answer first."
    assert strip_reasoning("No reasoning at all.") == "No reasoning at all."
    plain = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    stripping = RewardModel.from_pretrained(tiny_worldpm, device="cpu", strip_think=True)
    q = {"role": "user", "content": "What is 2 + 2?"}
    answer = {"role": "assistant", "content": "The answer is 4."}
    thinking = {"role": "assistant", "content": "<think>2 + 2: add them, 4.</think>\nThe answer is 4."}
    direct = plain.score([[q, answer]])[0]
    assert stripping.score([[q, thinking]])[0] == pytest.approx(direct, abs=1e-5)
    assert abs(plain.score([[q, thinking]])[0] - direct) > 1e-4  # off by default: the text is scored
    assert stripping.score([[q, answer]])[0] == pytest.approx(direct, abs=1e-5)  # normal text unchanged
    assert build_parser().parse_args(["serve", "--model", "m", "--strip-think"]).strip_think is True
