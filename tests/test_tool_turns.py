"""Multi-turn / tool-calling rollouts: tool calls and tool results are their own turns in each
family's format, the scored reply is the final assistant turn, and TRL's tool-calling
completions and veRL's multi-turn response layout both score as the structured trajectory.

The reference rendering is Qwen2.5's own chat template logic for tools (WorldPM's base model;
Qwen2.5-7B-Instruct's tokenizer_config.json, the branches for assistant ``tool_calls`` and
``tool`` messages), applied by transformers to the STRUCTURED messages, and scored by the
model-card reference of tests/wpr_testutils.py: independent of worldpm_reward's rendering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from wpr_testutils import ENDOFTEXT_ID, ReferenceWorldPM

from worldpm_reward import RewardModel
from worldpm_reward.errors import SampleError
from worldpm_reward.samples import parse_sample

#: Qwen2.5's chat template, without the ``tools`` system block (no tool schemas are passed).
QWEN25_TOOL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    '{%- elif message.role == "assistant" %}'
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    '{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}'
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPT = [{"role": "user", "content": "What is 17 * 23, and what's the weather in Zürich?"}]
#: A TRL tool-calling completion, as GRPOTrainer's tool loop builds it (trl 1.16
#: ``_tool_call_loop``): the assistant turn with ``tool_calls`` (OpenAI layout, arguments a
#: dict), one ``tool`` message per result (with the tool's name), then the final reply.
TRL_COMPLETION: list[dict[str, Any]] = [
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "multiply", "arguments": {"a": 17, "b": 23}}},
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}},
        ],
    },
    {"role": "tool", "name": "multiply", "content": "391"},
    {"role": "tool", "name": "weather", "content": "{'temp_c': 4, 'sky': 'cloudy'}"},
    {
        "role": "assistant",
        "content": "Let me also check the units.",
        "tool_calls": [{"type": "function", "function": {"name": "units", "arguments": {}}}],
    },
    {"role": "tool", "name": "units", "content": "celsius"},
    {"role": "assistant", "content": "17 * 23 = 391, and Zürich is cloudy at 4 °C."},
]


def _reference(ref: ReferenceWorldPM, messages: list[dict[str, Any]]) -> float:
    """Qwen2.5's template on the structured trajectory (empty system kept), scored by hand."""
    text = ref.tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, *messages],
        chat_template=QWEN25_TOOL_TEMPLATE,
        tokenize=False,
        add_generation_prompt=False,
    )
    ids = ref.tokenizer.encode(text, add_special_tokens=False)
    ids = ids if ids[-1] == ENDOFTEXT_ID else [*ids, ENDOFTEXT_ID]
    with torch.no_grad():
        hidden = ref.backbone(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1]
        h = torch.relu(hidden @ ref.w0.T + ref.b0)
        return float((h @ ref.w2.T + ref.b2)[0])


@pytest.fixture(scope="module")
def ref(tiny_worldpm: Path) -> ReferenceWorldPM:
    return ReferenceWorldPM(tiny_worldpm)


def test_tool_turns_render_as_qwen25s_template_does(reward_model: RewardModel, ref: ReferenceWorldPM) -> None:
    conv = [*PROMPT, *TRL_COMPLETION]
    want = _reference(ref, conv)
    (got,) = reward_model.score([conv])
    assert abs(got - want) <= 1e-5
    # the tool turns are context, not ignored: another tool result, another score
    other = [*PROMPT, *TRL_COMPLETION[:1], {"role": "tool", "content": "392"}, *TRL_COMPLETION[2:]]
    assert abs(reward_model.score([other])[0] - _reference(ref, other)) <= 1e-5
    assert abs(reward_model.score([other])[0] - got) > 1e-6
    # the scored reply is the final assistant turn
    assert parse_sample(conv).response == TRL_COMPLETION[-1]["content"]


def test_trl_tool_calling_completions_get_rewards(reward_model: RewardModel, ref: ReferenceWorldPM) -> None:
    from worldpm_reward.integrations.trl import WorldPMReward

    reward = WorldPMReward(scorer=reward_model)
    plain = [{"role": "assistant", "content": "It is 391."}]
    # a multimodal-style tool result: a list of text parts (TRL passes lists through)
    parts = [dict(m) for m in TRL_COMPLETION]
    parts[1] = {"role": "tool", "name": "multiply", "content": [{"type": "text", "text": "391"}]}
    metrics: dict[str, float] = {}
    out = reward([PROMPT] * 3, [TRL_COMPLETION, plain, parts], log_metric=metrics.__setitem__)
    assert metrics["worldpm/failed"] == 0.0
    want = [_reference(ref, [*PROMPT, *c]) for c in (TRL_COMPLETION, plain, TRL_COMPLETION)]
    assert all(o is not None and abs(o - w) <= 1e-5 for o, w in zip(out, want)), (out, want)


@pytest.mark.slow
def test_verl_multi_turn_response_layout_scores_as_the_trajectory(
    tiny_worldpm: Path, ref: ReferenceWorldPM
) -> None:
    """veRL's tool agent loop keeps tool results inside the response (response_mask 0) and its
    reward manager decodes the response with skip_special_tokens=True: rebuilt here with a
    ChatML policy tokenizer from the Qwen2.5 rendering of the same trajectory."""
    from wpr_policy import tiny_policy_tokenizer

    from worldpm_reward.integrations.verl import compute_score, split_tool_turns

    tok = tiny_policy_tokenizer(fmt="chatml")
    conv = [*PROMPT, *TRL_COMPLETION]
    render = dict(chat_template=QWEN25_TOOL_TEMPLATE, tokenize=False)
    full = tok.apply_chat_template(conv, add_generation_prompt=False, **render)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, **render)
    assert full.startswith(prompt)
    response_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    solution = tok.decode(response_ids, skip_special_tokens=True)  # as veRL's naive manager
    assert "<|im_start|>" not in solution and "<tool_response>" in solution
    turns = split_tool_turns(solution)
    assert turns is not None and [t["role"] for t in turns] == [
        "assistant", "tool", "tool", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert turns[-1]["content"] == TRL_COMPLETION[-1]["content"]
    kwargs = {"model": str(tiny_worldpm), "model_kwargs": {"device": "cpu"}, "shaping": {}}
    out = compute_score("tools", solution, "", {"prompt": PROMPT}, **kwargs)
    assert out["worldpm_failed"] == 0.0
    assert abs(out["score"] - _reference(ref, conv)) <= 1e-4  # the policy tokenizer's decode round trip
    # a full message list in extra_info (a custom agent loop's extra_fields) is used as it is
    out = compute_score("tools", "ignored", "", {"messages": conv}, **kwargs)
    assert abs(out["score"] - _reference(ref, conv)) <= 1e-5
    # a plain single-turn response is unchanged
    assert split_tool_turns("The answer is 391.") is None
    # a reply that quotes the markup, with no role header before it, is the reply's own text
    quoted = "Wrap each result in <tool_response>\nX\n</tool_response> tags."
    assert split_tool_turns(quoted) is None


@pytest.mark.slow
def test_polar_gets_tool_turns_as_its_own_turns(tmp_path: Path) -> None:
    from worldpm_reward.families.polar import PolarEncoder
    from worldpm_reward.testing import polar_tokenizer

    encoder = PolarEncoder(polar_tokenizer())
    sample = parse_sample({"messages": [*PROMPT, *TRL_COMPLETION], "reference": "391; cloudy, 4 °C."})
    text, cut, _ = encoder.text(sample)
    prompt_part = text.split("<|reward|>")[1]
    assert cut == 0
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 17, "b": 23}}\n</tool_call>' in prompt_part
    assert "<tool_response>\n391\n</tool_response>\n<tool_response>\n{'temp_c'" in prompt_part
    assert prompt_part.endswith("\n" + TRL_COMPLETION[-1]["content"] + "[UNUSED_TOKEN_130]")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}, {"role": "assistant", "content": "a"}],
         "messages[0].tool_calls"),
        ([*PROMPT, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
          {"role": "tool", "content": "r"}], "messages[2].role"),
        ([*PROMPT, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]},
          {"role": "assistant", "content": "a"}], "messages[1].tool_calls[0].arguments"),
        ([*PROMPT, {"role": "assistant", "content": "", "tool_calls": "f()"}, {"role": "assistant", "content": "a"}],
         "messages[1].tool_calls"),
    ],
)  # fmt: skip
def test_bad_tool_turns_name_the_field(messages: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(SampleError) as err:
        parse_sample(messages, index=7)
    assert err.value.field == field and "sample 7" in str(err.value)
