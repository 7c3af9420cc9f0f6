"""The transformers engine's speed options: ``compile=True`` (the packed backbone under
torch.compile) scores as the eager engine and the independent model-card reference do, within
fp32 error, keeps batch invariance, falls back to eager with the reason when compiling fails,
and is a CLI flag and a config key."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from wpr_testutils import ReferenceWorldPM

from worldpm_reward import RewardModel
from worldpm_reward.config import ModelConfig, load_config
from worldpm_reward.errors import ConfigError
from worldpm_reward.testing import grpo_groups, real_conversations


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_compile_is_a_cli_flag_and_a_config_key(tmp_path: Path) -> None:
    from worldpm_reward.cli import _model_config, build_parser

    parser = build_parser()
    score = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["score"]
    assert "--compile" in score.format_help()
    assert (
        _model_config(
            parser.parse_args(["score", "in.jsonl", "-o", "out.jsonl", "--model", "m", "--compile"])
        ).compile
        is True
    )
    assert (
        _model_config(parser.parse_args(["score", "in.jsonl", "-o", "out.jsonl", "--model", "m"])).compile
        is False
    )
    assert load_config(ModelConfig, overrides=["compile=true"]).compile is True
    with pytest.raises(ConfigError, match=r"compile.*engine='transformers'"):
        ModelConfig(compile=True, engine="vllm")


@pytest.mark.slow
def test_compiled_backbone_scores_as_eager_and_as_the_reference(tiny_worldpm: Path) -> None:
    eager = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32)
    compiled = RewardModel.from_pretrained(tiny_worldpm, device="cpu", min_shared_prefix=32, compile=True)
    convs = real_conversations(8)
    samples: list[Any] = [{"messages": c} for c in convs] + grpo_groups(n_prompts=2, group_size=4)
    got = compiled.score(samples)
    assert compiled.engine.compile_error is None and compiled.engine._compiled is not None
    assert compiled.last_stats.shared_groups >= 2  # the shared-prefix rows ran compiled too
    assert _max_diff(got, eager.score(samples)) <= 1e-4
    ref = ReferenceWorldPM(tiny_worldpm)
    assert _max_diff(got[:8], [ref.score(c) for c in convs]) <= 1e-4
    # batch invariance: alone (a one-row batch) == in the batch
    assert _max_diff([compiled.score([s])[0] for s in samples[::4]], got[::4]) <= 1e-5
    assert len(set(got)) == len(got)


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_naming_the_reason(
    tiny_worldpm: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import worldpm_reward.engines.transformers as engine_module

    def no_compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        raise RuntimeError("no C++ compiler found (test)")

    def failing_compile(backbone: torch.nn.Module, device: torch.device) -> Any:
        return torch.compile(backbone, backend=no_compiler, dynamic=True)

    monkeypatch.setattr(engine_module, "compile_backbone", failing_compile)
    eager = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    compiled = RewardModel.from_pretrained(tiny_worldpm, device="cpu", compile=True)
    samples = [{"messages": c} for c in real_conversations(4)]
    with caplog.at_level(logging.WARNING, logger="worldpm_reward.engines.transformers"):
        got = compiled.score(samples)
    reason = compiled.engine.compile_error
    assert reason is not None and "no C++ compiler found (test)" in reason
    assert any(
        "running the backbone eagerly" in r.getMessage() and "no C++" in r.getMessage()
        for r in caplog.records
    )
    assert compiled.engine._compiled is None
    assert all(r.error is None for r in compiled.score_detailed(samples))
    assert _max_diff(got, eager.score(samples)) <= 1e-6
