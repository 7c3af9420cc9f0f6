"""OpenRLHF never receives a None reward by default: through OpenRLHF 0.11.2's own client
(``SingleTurnAgentExecutor``, one sample per request, as its rollout actors call it) a batch
of rollouts with one unscorable sample gets real rewards for the others and the documented
fallback (-10) for that one, from a server started with no options; the reward-function file
does the same when no server answers at all."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from wpr_policy import tiny_policy_tokenizer
from wpr_servers import pip_target, server_process

from worldpm_reward import RewardModel
from worldpm_reward.serving.protocol import DEFAULT_FALLBACK_REWARD

pytestmark = pytest.mark.framework


@pytest.fixture(scope="module")
def agent() -> Any:
    try:  # OpenRLHF's own environment (tests/integrations/test_coinstall.py): the installed package
        from openrlhf.utils import agent as installed

        return installed
    except ImportError:
        pass
    sys.path.insert(0, str(pip_target("openrlhf==0.11.2")))
    try:
        from openrlhf.utils import agent
    finally:
        sys.path.pop(0)
    return agent


class FakeEngine:
    """Stands in for vLLM: 'generates' a fixed reply (token ids of the policy tokenizer)."""

    def __init__(self, reply_ids: list[int]) -> None:
        self.reply_ids = reply_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=self.reply_ids, finish_reason="stop", logprobs=None)]
        )


async def _rollouts(agent: Any, remote: str, tok: Any, convs: list[list[dict[str, str]]]) -> list[Any]:
    """One rollout per conversation, concurrently, each through OpenRLHF's executor."""

    async def one(conv: list[dict[str, str]]) -> Any:
        prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        reply_ids = tok(conv[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=remote)
        params = SimpleNamespace(max_tokens=None, logprobs=None)
        out = await executor.execute(prompt, "label", params, 4096, tok, FakeEngine(reply_ids))
        return out["reward"]

    return await asyncio.gather(*(one(c) for c in convs))


def _convs() -> list[list[dict[str, str]]]:
    qa = [("Tips for better sleep?", "Keep a schedule."), ("Name a prime.", "Seven."), ("Say hi.", "")]
    qa.append(("What is 2+2?", "Four."))
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in qa]


@pytest.mark.slow
def test_one_bad_sample_gets_the_default_fallback_not_none(
    tiny_worldpm: Path, agent: Any, tmp_path: Path
) -> None:
    tok = tiny_policy_tokenizer(fmt="chatml")
    convs = _convs()  # the third reply is empty: that sample cannot be scored
    direct = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    with server_process(tiny_worldpm, log=tmp_path / "server.log") as (url, _):  # no options
        rewards = asyncio.run(_rollouts(agent, f"{url}/get_reward", tok, convs))
    assert all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], float) for r in rewards), rewards
    assert rewards[2] == [DEFAULT_FALLBACK_REWARD] == [-10.0]
    for i in (0, 1, 3):
        assert abs(rewards[i][0] - direct.score([convs[i]])[0]) <= 1e-4


def test_reward_func_file_with_no_server_answers_the_fallback(
    agent: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worldpm_reward.integrations.openrlhf import REWARD_FUNC_FILE

    monkeypatch.setenv("WORLDPM_REWARD_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WORLDPM_REWARD_RETRIES", "1")
    monkeypatch.setenv("WORLDPM_REWARD_TIMEOUT", "2")
    tok = tiny_policy_tokenizer(fmt="chatml")
    with caplog.at_level("ERROR"):
        rewards = asyncio.run(_rollouts(agent, REWARD_FUNC_FILE, tok, _convs()[:2]))
    assert rewards == [[-10.0], [-10.0]]
    assert any("not scored" in r.getMessage() for r in caplog.records)
