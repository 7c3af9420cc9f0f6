"""POLAR: native InternLM2 loading and POLAR's encoding against an independent reference
(plain torch InternLM2 forward, xtuner's client logic re-implemented here), and the same
scores through every surface."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from wpr_servers import server_process
from wpr_testutils import DATA

from worldpm_reward import CheckpointError, RewardModel
from worldpm_reward.cli import main
from worldpm_reward.packing import SEGMENT_ATTENTION
from worldpm_reward.serving.client import RemoteScorer
from worldpm_reward.testing import write_tiny_polar


@pytest.fixture(scope="module")
def polar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_polar(tmp_path_factory.mktemp("polar") / "tiny-polar", seed=3)


@pytest.fixture(scope="module")
def polar_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_polar(tmp_path_factory.mktemp("polar") / "tiny-polar-bin", seed=4, weights_format="bin")


def real_polar_samples(n: int = 80) -> list[dict[str, Any]]:
    """GSM8K questions with their solutions as references; outputs are the right solution,
    another problem's solution, or the solution cut short; plus PandaLM pairs."""
    with gzip.open(DATA / "prompts" / "gsm8k_test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n // 2), f)]
    out = []
    for i, r in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["answer"]
        output = [r["answer"], other, r["answer"][: len(r["answer"]) // 2]][i % 3]
        out.append({"prompt": r["question"], "reference": r["answer"], "response": output})
    for r in json.loads((DATA / "preferences" / "pandalm" / "pandalm_testset-v1.json").read_text())[: n // 2]:
        if r["response1"].strip() and r["response2"].strip():
            prompt = [
                {"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")}
            ]
            out.append({"prompt": prompt, "reference": r["response1"], "response": r["response2"]})
    return out[:n]


class ReferencePolar:
    """Written from POLAR's model card, InternLM2's modeling code and xtuner's RewardModelClient."""

    def __init__(self, path: Path, max_length: int = 16384, max_response_length: int = 4096) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.cfg = json.loads((path / "config.json").read_text())
        if (path / "model.safetensors").exists():
            self.w = load_file(str(path / "model.safetensors"))
        else:
            self.w = torch.load(path / "pytorch_model.bin", weights_only=True)
        self.w = {k: v.float() for k, v in self.w.items()}
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.max_length, self.max_response_length = max_length - 4, max_response_length

    def text(self, prompt: Any, reference: str, output: str) -> str:
        tok = self.tok
        p = "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else prompt
        p_ids = tok.encode(p, add_special_tokens=True)
        r1_ids = tok.encode(reference, add_special_tokens=True)
        r2_ids = tok.encode(output, add_special_tokens=True)
        if len(r1_ids) > self.max_response_length:
            r1_ids = r1_ids[-self.max_response_length :]
        if len(r2_ids) > self.max_response_length:
            r2_ids = r2_ids[-self.max_response_length :]
        max_prompt = (self.max_length - len(r1_ids) - len(r2_ids)) // 2
        if len(p_ids) > max_prompt:
            p_ids = p_ids[-max_prompt:]
        p, r1, r2 = (tok.decode(x, skip_special_tokens=True) for x in (p_ids, r1_ids, r2_ids))
        return p + "\n" + r1 + "<|reward|>" + p + "\n" + r2 + "[UNUSED_TOKEN_130]"

    @torch.no_grad()
    def score(self, prompt: Any, reference: str, output: str) -> float:
        c, w = self.cfg, self.w
        ids = torch.tensor(self.tok.encode(self.text(prompt, reference, output), add_special_tokens=True))
        assert ids[-1].item() == c["reward_token_id"]
        h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        d, groups, t = h // heads, heads // kv, len(ids)

        def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(t).float(), inv)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

        def rope(x: torch.Tensor) -> torch.Tensor:  # x: (t, n, d)
            half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
            return x * cos[:, None] + half * sin[:, None]

        x = w["model.tok_embeddings.weight"][ids]
        mask = torch.full((t, t), float("-inf")).triu(1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = rms(x, w[p + "attention_norm.weight"])
            qkv = (a @ w[p + "attention.wqkv.weight"].T).view(t, kv, groups + 2, d)  # "b q (h gs d)"
            q = rope(qkv[:, :, :groups].reshape(t, heads, d))
            k = rope(qkv[:, :, -2]).repeat_interleave(groups, dim=1)
            v = qkv[:, :, -1].repeat_interleave(groups, dim=1)
            att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask, -1)
            x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, h) @ w[p + "attention.wo.weight"].T
            f = rms(x, w[p + "ffn_norm.weight"])
            gate = torch.nn.functional.silu(f @ w[p + "feed_forward.w1.weight"].T)
            x = x + (gate * (f @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
        x = rms(x, w["model.norm.weight"])
        return float(x[-1] @ w["v_head.weight"][0])


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["polar", "polar_bin"])
def test_scores_match_independent_reference(ckpt: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(ckpt)
    rm = RewardModel.from_pretrained(path, device="cpu")
    assert rm.family == "polar"
    samples = real_polar_samples(80)
    ours = rm.score(samples)
    ref = ReferencePolar(path)
    theirs = [ref.score(s["prompt"], s["reference"], s["response"]) for s in samples]
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    assert max(diffs) <= 1e-4, max(diffs)
    assert len({round(v, 5) for v in theirs}) > 0.9 * len(theirs)  # informative fixture
    # batch invariance
    alone = [rm.score([s])[0] for s in samples[:20]]
    assert max(abs(a - b) for a, b in zip(alone, ours[:20])) <= 1e-5


@pytest.mark.slow
def test_truncation_follows_the_reference_client(polar: Path) -> None:
    long = real_polar_samples(80)[40:]  # PandaLM: long prompts and answers
    rm = RewardModel.from_pretrained(polar, device="cpu", max_length=120)
    rm.encoder.max_response_length = 40
    ref = ReferencePolar(polar, max_length=120, max_response_length=40)
    results = rm.score_detailed(long[:12])
    for s, r in zip(long[:12], results):
        assert abs(r.score - ref.score(s["prompt"], s["reference"], s["response"])) <= 1e-4
    assert any(r.truncated for r in results) and all(r.num_tokens <= 124 for r in results)


@pytest.mark.slow
def test_a_small_max_length_shrinks_the_answer_caps_to_fit_it(polar: Path) -> None:
    """Under max_length <= 2 x 4096 + 4 the reference client's 4096-token caps overrun its own
    budget (221 tokens for max_length=200 before): the caps shrink to (max_length - 4) // 4,
    and the input is the client's with those caps."""
    long = real_polar_samples(80)[40:52]  # PandaLM: long prompts and answers
    rm = RewardModel.from_pretrained(polar, device="cpu", max_length=60)
    assert rm.encoder.max_response_length == 4096
    ref = ReferencePolar(polar, max_length=60, max_response_length=14)
    results = rm.score_detailed(long)
    for s, r in zip(long, results):
        assert r.num_tokens <= 64  # re-tokenizing the decoded cuts may add a few, as in the client
        assert abs(r.score - ref.score(s["prompt"], s["reference"], s["response"])) <= 1e-4
    assert any(r.response_truncated for r in results)


def test_an_encoding_may_pass_max_length_only_by_the_overshoot(polar: Path) -> None:
    """The reference client's budget counts a BOS in each piece; when every piece is cut the
    input is one token past max_length. Engines size their limits by ``max_tokens``; an
    encoding past it is that sample's error (on every engine: it happens in the encoder)."""

    def words(k: int, tag: int) -> str:
        return " ".join(f"word{tag}x{i}" for i in range(k))

    cut = [
        {"prompt": words(400, t), "reference": words(300, t + 1), "response": words(301, t + 2)}
        for t in (0, 3)
    ]
    rm = RewardModel.from_pretrained(polar, device="cpu", max_length=128)
    assert rm.encoder.max_tokens == 128 + rm.encoder.OVERSHOOT == rm.engine.max_length
    results = rm.score_detailed([*cut, real_polar_samples(2)[0]])
    assert [r.num_tokens for r in results[:2]] == [129, 129] and all(r.error is None for r in results)
    rm.encoder.OVERSHOOT = 0  # type: ignore[misc]
    strict = rm.score_detailed([*cut, real_polar_samples(2)[0]])
    assert all(r.error and "encoded to 129 tokens, past max_length=128" in r.error for r in strict[:2])
    assert strict[2].error is None and abs(strict[2].score - results[2].score) <= 1e-6


@pytest.mark.slow
def test_missing_and_misshaped_weights_are_refused(tmp_path: Path) -> None:
    path = write_tiny_polar(
        tmp_path / "broken", drop=("v_head.weight", "model.layers.1.attention.wqkv.weight")
    )
    with pytest.raises(CheckpointError) as info:
        RewardModel.from_pretrained(path, device="cpu")
    assert "v_head.weight" in str(info.value) and "model.layers.1.attention.wqkv.weight" in str(info.value)


def test_rope_scaling_only_as_internlm2_knows_it(polar: Path, tmp_path: Path) -> None:
    """InternLM2's modeling code scales RoPE as 'dynamic' or 'linear' only; another type is
    refused naming the field (it was a KeyError from transformers' RoPE validation)."""
    import shutil

    for kind, ok in (("yarn", False), ("longrope", False), ("linear", True)):
        path = tmp_path / kind
        shutil.copytree(polar, path)
        config = json.loads((path / "config.json").read_text())
        config["rope_scaling"] = {"type": kind, "factor": 2.0}
        (path / "config.json").write_text(json.dumps(config))
        if ok:
            assert (
                RewardModel.from_pretrained(path, device="cpu").model.config.rope_parameters["rope_type"]
                == kind
            )
        else:
            with pytest.raises(CheckpointError, match=rf"rope_scaling type '{kind}' is not one InternLM2"):
                RewardModel.from_pretrained(path, device="cpu")


@pytest.mark.slow
def test_family_override_and_errors(polar: Path, tiny_worldpm: Path) -> None:
    with pytest.raises(CheckpointError):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", family="polar")
    rm = RewardModel.from_pretrained(polar, device="cpu", family="polar")
    r = rm.score_detailed([{"prompt": "q", "response": "a"}])[0]
    assert r.error and "field 'reference'" in r.error


@pytest.mark.slow
def test_same_scores_through_every_surface(
    polar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = real_polar_samples(12)
    rm = RewardModel.from_pretrained(polar, device="cpu")
    want = rm.score(samples)
    # the reference as a message list (xtuner's client accepts both): role names dropped,
    # contents joined by newlines, as POLAR's encoding joins messages
    listed = [{**s, "reference": [{"role": "assistant", "content": s["reference"]}]} for s in samples]
    assert rm.score(listed) == want
    two = {
        **samples[0],
        "reference": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    }
    assert rm.score([two]) == rm.score([{**samples[0], "reference": "a\nb"}])
    bad = rm.score_detailed([{**samples[0], "reference": [{"role": "assistant"}]}, samples[1]])
    assert bad[0].error and "reference[0].content" in bad[0].error and abs(bad[1].score - want[1]) <= 1e-6

    # CLI
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert (
        main(["score", "--model", str(polar), "--device", "cpu", str(src), "-o", str(tmp_path / "out.jsonl")])
        == 0
    )
    cli = [json.loads(x)["score"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert max(abs(a - b) for a, b in zip(cli, want)) <= 1e-5
    src.write_text("".join(json.dumps(s) + "\n" for s in listed))
    assert (
        main(["score", "--model", str(polar), "--device", "cpu", str(src), "-o", str(tmp_path / "o2.jsonl")])
        == 0
    )
    assert [json.loads(x)["score"] for x in (tmp_path / "o2.jsonl").read_text().splitlines()] == cli

    # TRL adapter: a 'reference' dataset column
    from worldpm_reward.integrations.trl import WorldPMReward

    reward = WorldPMReward(polar, model_kwargs={"device": "cpu"})
    prompts = [
        s["prompt"] if isinstance(s["prompt"], list) else [{"role": "user", "content": s["prompt"]}]
        for s in samples
    ]
    completions = [[{"role": "assistant", "content": s["response"]}] for s in samples]
    trl = reward(prompts, completions, reference=[s["reference"] for s in samples])
    assert max(abs(a - b) for a, b in zip(trl, want)) <= 1e-5
    assert reward(prompts, completions, reference=[s["reference"] for s in listed]) == trl

    # veRL
    import importlib

    monkeypatch.setenv("WORLDPM_REWARD_MODEL", str(polar))
    monkeypatch.setenv("WORLDPM_REWARD_DEVICE", "cpu")
    verl = importlib.reload(importlib.import_module("worldpm_reward.integrations.verl"))
    got = verl.compute_score_batch(
        ["gsm8k"] * len(samples),
        [s["response"] for s in samples],
        [s["reference"] for s in samples],
        [{"prompt": s["prompt"]} for s in samples],
    )
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
    # the reference as a message list (as xtuner's client accepts it) scores the same
    as_messages = verl.compute_score_batch(
        ["gsm8k"] * len(samples),
        [s["response"] for s in samples],
        [[{"role": "assistant", "content": s["reference"]}] for s in samples],
        [{"prompt": s["prompt"]} for s in samples],
    )
    assert as_messages == got
    # a sample with no prompt: the fallback floor, below every real reward (it cannot win), not a crash
    assert verl.compute_score_batch(["x"], ["a"], ["b"], [{}]) == [min(verl.FALLBACK_FLOOR, min(got) - 1.0)]
    with pytest.raises(ValueError, match="extra_info"):
        verl.compute_score_batch(["x"], ["a"], ["b"], [{}], fallback="raise")
    # a number as ground_truth is not taken as a reference, and the error says so
    with pytest.raises(ValueError, match="not as a number"):
        verl.compute_score_batch(["x"], ["a"], [72], [{"prompt": "q"}], fallback="raise")

    # server: native API 'reference' and OpenRLHF 'labels'
    with server_process(polar, log=tmp_path / "srv.log") as (url, _):
        r = httpx.post(f"{url}/v1/score", json={"samples": samples}, timeout=60).json()["results"]
        assert max(abs(x["score"] - w) for x, w in zip(r, want)) <= 1e-5
        r2 = httpx.post(f"{url}/v1/score", json={"samples": listed}, timeout=60).json()["results"]
        assert [x["score"] for x in r2] == [x["score"] for x in r]
        remote = RemoteScorer(url).score_detailed(listed)
        assert [x.score for x in remote] == [x["score"] for x in r]
        s0 = samples[0]
        prompt = f"<|im_start|>user\n{s0['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        body = {
            "query": [prompt + s0["response"] + "<|im_end|>"],
            "prompts": [prompt],
            "labels": [s0["reference"]],
        }
        rewards = httpx.post(f"{url}/get_reward", json=body, timeout=60).json()["rewards"]
        assert abs(rewards[0] - want[0]) <= 1e-5
        body["labels"] = [listed[0]["reference"]]
        assert httpx.post(f"{url}/get_reward", json=body, timeout=60).json()["rewards"] == rewards


@pytest.mark.slow
def test_selftest_runs_for_polar(polar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", "--model", str(polar), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "family=polar" in out and "no published known answers" in out and code in (0, 1)
    from worldpm_reward.families import known_answers_for

    assert [a.score for a in known_answers_for("internlm/POLAR-7B")] == [-0.57, -11.03]


@pytest.mark.slow
def test_polar_honours_device_map_attn_implementation_and_dtype(polar: Path) -> None:
    """Like WorldPM: a device_map is dispatched (accelerate), the attention kernel and dtype are
    the ones asked for, and the scores do not change."""
    samples = real_polar_samples(8)
    base = RewardModel.from_pretrained(polar, device="cpu")
    want = base.score(samples)
    assert base.model.config._attn_implementation == SEGMENT_ATTENTION  # sdpa, one segment at a time
    assert base.engine.segment_attention

    mapped = RewardModel.from_pretrained(polar, device_map={"": "cpu"}, attn_implementation="eager")
    assert mapped.model.hf_device_map == {"": "cpu"}
    assert mapped.model.config._attn_implementation == "eager"
    assert max(abs(a - b) for a, b in zip(mapped.score(samples), want)) <= 1e-4

    auto = RewardModel.from_pretrained(polar, device_map="auto")
    assert set(auto.model.hf_device_map.values()) == {"cpu"}  # no GPU here: every module on the CPU
    assert max(abs(a - b) for a, b in zip(auto.score(samples), want)) <= 1e-5

    half = RewardModel.from_pretrained(polar, device="cpu", dtype="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert max(abs(a - b) for a, b in zip(half.score(samples), want)) <= 0.1 * max(map(abs, want)) + 0.1


def test_a_saved_polar_model_is_refused_naming_the_original(polar: Path, tmp_path: Path) -> None:
    """worldpm-reward runs POLAR's InternLM2 weights as a LlamaModel; what ``save_pretrained``
    writes is that Llama layout, not POLAR's, so loading it back is refused with the reason."""
    rm = RewardModel.from_pretrained(polar, device="cpu")
    saved = tmp_path / "saved"
    rm.model.save_pretrained(saved)
    rm.tokenizer.save_pretrained(saved)
    with pytest.raises(CheckpointError, match="original POLAR checkpoint"):
        RewardModel.from_pretrained(saved, device="cpu")
