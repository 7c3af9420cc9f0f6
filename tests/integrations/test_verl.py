"""WorldPM through veRL's own reward loop (veRL 0.9.1 installed --no-deps, as OpenRLHF is):
its default config, its ``load_reward_manager``, its naive reward manager and the reward-loop
worker's concurrent per-sample calls, with the example config in recipes/configs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("omegaconf", reason="needs omegaconf (the 'test' extra), which veRL's config uses")
pytest.importorskip("tensordict", reason="needs tensordict (the 'test' extra), which veRL's DataProto uses")

from omegaconf import OmegaConf
from wpr_policy import gsm8k_questions, tiny_policy_tokenizer
from wpr_servers import pip_target, server_process

from worldpm_reward import RewardModel

pytestmark = pytest.mark.framework

VERL = "verl==0.9.1"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "recipes" / "configs" / "verl_worldpm.yaml"
OURS = "pkg://worldpm_reward.integrations.verl"


@pytest.fixture(scope="module")
def verl() -> Iterator[Path]:
    try:  # veRL's own environment (tests/integrations/test_coinstall.py): the installed veRL
        from importlib.metadata import version

        if version("verl") == VERL.split("==")[1]:
            import verl as installed

            yield Path(installed.__file__).parents[1]
            return
    except ImportError:
        pass
    target = pip_target(VERL)
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))


def _keys(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return set()
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        out |= _keys(v, prefix + k + ".")
    return out


def _config(verl: Path, **reward_kwargs: Any) -> Any:
    """veRL's default trainer config with the example on top (as Hydra composes it)."""
    default = OmegaConf.load(verl / "verl" / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    example = OmegaConf.load(EXAMPLE)
    assert list(example.defaults) == ["ppo_trainer", "_self_"]
    assert "pkg://verl.trainer.config" in example.hydra.searchpath
    del example["defaults"], example["hydra"]
    ours = OmegaConf.to_container(example)
    theirs = OmegaConf.to_container(default)
    new = {k for k in _keys(ours) - _keys(theirs)}
    # everything the example sets exists in veRL's config, except what veRL documents as free-form
    assert all(
        k.startswith(
            ("reward.custom_reward_function.reward_kwargs", "ray_kwargs.ray_init.runtime_env.env_vars")
        )
        for k in new
    ), new
    cfg = OmegaConf.merge(default, example)
    assert cfg.reward.custom_reward_function.path == OURS
    for k, v in reward_kwargs.items():
        cfg.reward.custom_reward_function.reward_kwargs[k] = v
    return cfg


def _data(tok: Any, questions: list[str], answers: list[str], infos: list[Any]) -> Any:
    """A rollout batch as veRL's reward loop receives it: left-padded prompts, right-padded responses."""
    import numpy as np
    from verl import DataProto

    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in questions]
    responses = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id or 0
    p_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    r_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor(
        [
            [0] * (p_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (r_len - len(r))
            for p, r in zip(prompts, responses)
        ]
    )
    return DataProto.from_dict(
        tensors={
            "prompts": p_ids,
            "responses": r_ids,
            "input_ids": torch.cat([p_ids, r_ids], 1),
            "attention_mask": mask,
        },
        non_tensors={
            "data_source": np.array(["gsm8k"] * len(questions), dtype=object),
            "reward_model": np.array([{"ground_truth": ""} for _ in questions], dtype=object),
            "extra_info": np.array(infos, dtype=object),
        },
    )


def _run_reward_loop(cfg: Any, tok: Any, data: Any) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """veRL's reward-loop worker (its compute_score_batch: one task per sample) and manager."""
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

    manager = load_reward_manager(cfg, tok)
    worker = RewardLoopWorker.__new__(RewardLoopWorker)  # its __init__ only loads tokenizers from a hub
    worker.config, worker.reward_manager, worker.loop = cfg, manager, manager.loop
    outputs = manager.loop.run_until_complete(worker.compute_score_batch(data))
    scores = [o["reward_score"] for o in outputs]
    return outputs, resolve_reward_manager_cls(cfg).assemble_rm_scores(data, scores)


@pytest.fixture(scope="module")
def batch() -> tuple[Any, list[str], list[str], list[Any]]:
    tok = tiny_policy_tokenizer()
    questions = gsm8k_questions(12)
    answers = [f"Step by step: {q.split()[0]} ... the answer is {i}." for i, q in enumerate(questions)]
    infos: list[Any] = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    infos[5] = {"something_else": 1}  # no prompt: this sample's error, not the batch's
    return tok, questions, answers, infos


def _expected(rm: RewardModel, tok: Any, data: Any, questions: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for i, q in enumerate(questions):
        r_len = data.batch["responses"].shape[1]
        n = int(data.batch["attention_mask"][i, -r_len:].sum())
        text = tok.decode(data.batch["responses"][i, :n], skip_special_tokens=True)  # as veRL decodes
        out.append(rm.score([[{"role": "user", "content": q}, {"role": "assistant", "content": text}]])[0])
    out[5] = None
    return out


@pytest.mark.slow
def test_async_reward_function_batches_a_workers_calls_and_matches_the_core(
    verl: Path, tiny_worldpm: Path, batch: Any
) -> None:
    from worldpm_reward.integrations import verl as ours

    tok, questions, answers, infos = batch
    cfg = _config(verl, url=None, model=str(tiny_worldpm), model_kwargs={"device": "cpu"})
    data = _data(tok, questions, answers, infos)
    before = ours.batch_stats()
    outputs, rm_scores = _run_reward_loop(cfg, tok, data)
    after = ours.batch_stats()
    want = _expected(RewardModel.from_pretrained(tiny_worldpm, device="cpu"), tok, data, questions)
    got = [o["reward_score"] for o in outputs]
    for g, w in zip(got, want):
        if w is not None:
            assert abs(g - min(max(w, -5.0), 5.0)) <= 1e-4  # the example clips to [-5, 5]
    # the sample without a prompt: flagged, and the config's clip_min: at or below EVERY real reward
    assert [o["reward_extra_info"]["worldpm_failed"] for o in outputs] == [float(i == 5) for i in range(12)]
    assert got[5] == -5.0 and all(got[5] <= g for i, g in enumerate(got) if i != 5)
    # 12 concurrent per-sample calls were scored in (far) fewer calls
    assert after["samples"] - before["samples"] == 12
    assert 1 <= after["batches"] - before["batches"] <= 3
    # veRL put each reward on its response's last real token
    r_len = data.batch["responses"].shape[1]
    for i in range(12):
        n = int(data.batch["attention_mask"][i, -r_len:].sum())
        assert rm_scores[i, n - 1].item() == pytest.approx(got[i]) and rm_scores[
            i
        ].abs().sum().item() == pytest.approx(abs(got[i]))


@pytest.mark.slow
def test_sync_reward_function_over_http_and_the_legacy_batch_form(
    verl: Path, tiny_worldpm: Path, batch: Any, tmp_path: Path
) -> None:
    from worldpm_reward.integrations.verl import compute_score_batch

    tok, questions, answers, infos = batch
    data = _data(tok, questions, answers, infos)
    want = _expected(RewardModel.from_pretrained(tiny_worldpm, device="cpu"), tok, data, questions)
    with server_process(tiny_worldpm, log=tmp_path / "s.log") as (url, _):
        cfg = _config(verl, url=url, fallback=-7.5, shaping={})
        cfg.reward.custom_reward_function.name = "compute_score"
        outputs, _ = _run_reward_loop(cfg, tok, data)
        got = [o["reward_score"] for o in outputs]
        assert got[5] == -7.5 and outputs[5]["reward_extra_info"]["worldpm_failed"] == 1.0
        assert all(abs(g - w) <= 1e-4 for g, w in zip(got, want) if w is not None)
        assert all(o["reward_extra_info"]["worldpm_raw"] == o["reward_score"] for o in outputs)

        texts = [tok.decode(data.batch["responses"][i], skip_special_tokens=True) for i in range(12)]
        legacy = compute_score_batch(
            ["gsm8k"] * 12, texts, [""] * 12, infos, url=url, fallback=-7.5, shaping={}
        )
        assert legacy[5] == -7.5 and len(legacy) == 12
        assert all(abs(g - w) <= 1e-4 for g, w in zip(legacy, want) if w is not None)


@pytest.mark.slow
def test_unclipped_fallback_never_out_scores_a_real_answer(
    verl: Path, tiny_worldpm: Path, batch: Any
) -> None:
    """No clip_min: the failure reward is below every real reward of the batch, also when the
    failed sample is scored FIRST (the old "lowest so far" gave 0.3553 over 0.2431 there)."""
    from worldpm_reward.integrations.verl import FALLBACK_FLOOR, compute_score

    _tok, _questions, answers, infos = batch
    kwargs = {
        "model": str(tiny_worldpm),
        "model_kwargs": {"device": "cpu"},
        "shaping": {},
        "report_every_s": 1e9,
    }
    failed = compute_score("gsm8k", "an answer", "", {"no_prompt": 1}, **kwargs)
    real = [
        compute_score("gsm8k", a, "", info, **kwargs)["score"]
        for a, info in zip(answers, infos)
        if "prompt" in info
    ]
    assert failed["worldpm_failed"] == 1.0 and failed["score"] == FALLBACK_FLOOR
    assert all(failed["score"] < r for r in real), (failed, real)
    # a real reward below the floor moves the floor below it
    shifted = {**kwargs, "shaping": {"normalize": "fixed", "mean": 50.0, "std": 1.0}}  # rewards near -50
    low = compute_score("gsm8k", "x", "", {"prompt": "q"}, **shifted)
    again = compute_score("gsm8k", "x", "", {}, **shifted)
    assert low["score"] < FALLBACK_FLOOR and again["score"] == low["score"] - 1.0


@pytest.mark.slow
def test_shipped_config_passes_verls_own_validation(verl: Path, tmp_path: Path) -> None:
    """The example's header command, through veRL's Hydra entry point (verl.trainer.main_ppo:main:
    Hydra composition, then its validate_config), with only the launch (run_ppo) stubbed out."""
    import subprocess

    pytest.importorskip("hydra", reason="needs hydra-core (the 'test' extra), veRL's entry point")
    script = tmp_path / "validate.py"
    script.write_text(
        "import sys\n"
        "import verl.trainer.main_ppo as m\n"
        "m.run_ppo = lambda config, task_runner_class: print('LAUNCH', config.trainer.n_gpus_per_node)\n"
        "sys.argv = ['main_ppo', *sys.argv[1:]]\n"
        "m.main()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(verl), *sys.path])}
    run = subprocess.run(
        [sys.executable, str(script), "--config-path", str(EXAMPLE.parent), "--config-name", EXAMPLE.stem,
         f"data.train_files={tmp_path}/train.parquet", f"data.val_files={tmp_path}/test.parquet",
         "actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,  # Hydra writes outputs/ there
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "All configuration checks passed" in out and "LAUNCH 4" in out, out[-3000:]
    # the header's command is this one
    header = EXAMPLE.read_text().split("hydra:")[0]
    assert "python -m verl.trainer.main_ppo" in header and "data.train_files=" in header
    assert "data.val_files=" in header and "actor_rollout_ref.model.path=" in header


def test_unreachable_server_gives_fallbacks_or_raises_when_asked(verl: Path) -> None:
    from worldpm_reward.integrations.verl import compute_score

    kwargs = {
        "url": "http://127.0.0.1:9",  # nothing listens there
        "client_kwargs": {"retries": 0, "timeout_s": 2.0},
        "fallback": 0.25,
        "shaping": {},
    }
    out = compute_score("x", "hello", "", {"prompt": "hi"}, **kwargs)
    assert out == {"score": 0.25, "worldpm_raw": 0.25, "worldpm_failed": 1.0}
    with pytest.raises(ValueError, match="scoring failed"):
        compute_score("x", "hello", "", {"prompt": "hi"}, **{**kwargs, "fallback": "raise"})


def test_server_down_from_the_start_is_loud_and_low_never_a_quiet_zero(
    verl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worldpm_reward.integrations.verl import compute_score_batch, failure_stats

    kwargs = {
        "url": "http://127.0.0.1:9",  # nothing listens there
        "client_kwargs": {"retries": 0, "timeout_s": 2.0},
        "shaping": {"clip_min": -5.0, "clip_max": 5.0},
        "report_every_s": 0.0,  # a summary line on every call
    }
    before = failure_stats()
    with caplog.at_level("INFO", logger="worldpm_reward.integrations.verl"):
        out = compute_score_batch(["x"] * 3, ["a", "b", "c"], [""] * 3, [{"prompt": "q"}] * 3, **kwargs)
    assert out == [-5.0, -5.0, -5.0]  # fallback "min": the config's floor, not 0.0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "ALL 3 samples" in errors[0].getMessage() and "-5.0" in errors[0].getMessage()
    summary = [
        r.getMessage()
        for r in caplog.records
        if "samples," in r.getMessage() and "failed (" in r.getMessage()
    ]
    assert summary and "3 samples, 3 failed (100.0%)" in summary[-1]
    after = failure_stats()
    assert after["failed"] - before["failed"] == 3 and after["samples"] - before["samples"] == 3

    # the async path (the one the module recommends) raises the same alarm through its batcher
    import asyncio

    from worldpm_reward.integrations.verl import compute_score_async

    caplog.clear()

    async def three() -> list[float]:
        calls = [
            compute_score_async("x", s, "", {"prompt": "q"}, **{**kwargs, "url": "http://127.0.0.1:9/"})
            for s in "abc"
        ]
        return [r["score"] if isinstance(r, dict) else r for r in await asyncio.gather(*calls)]

    with caplog.at_level("INFO", logger="worldpm_reward.integrations.verl"):
        assert asyncio.run(three()) == [-5.0, -5.0, -5.0]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("ALL" in e and "reachable" in e for e in errors), errors


def test_a_changed_environment_gets_its_own_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the environment are part of what a backend is cached by: a worker whose
    WORLDPM_REWARD_URL (or model) changes does not keep scoring with the first one."""
    from worldpm_reward.integrations import verl

    monkeypatch.setenv("WORLDPM_REWARD_URL", "http://127.0.0.1:9")
    first = verl._backend({})
    assert verl._backend({}) is first  # cached
    monkeypatch.setenv("WORLDPM_REWARD_URL", "http://127.0.0.1:11")
    second = verl._backend({})
    assert second is not first
    assert [u.rsplit(":", 1)[1].rstrip("/") for u in second.reward.scorer.urls] == ["11"]
