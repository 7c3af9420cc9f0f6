"""ModelConfig is the one declaration of the load and batching options: from_pretrained, the
CLI flags and adapters' model_kwargs all come from it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from worldpm_reward import ConfigError, ModelConfig, RewardModel
from worldpm_reward.cli import build_parser
from worldpm_reward.config import choices_of, cli_fields


def _flags(command: str) -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[index]
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("command", ["score", "serve", "selftest", "calibrate"])
def test_cli_model_flags_are_generated_from_model_config(command: str) -> None:
    flags = _flags(command)
    hints = typing.get_type_hints(ModelConfig)
    for f in cli_fields(ModelConfig):
        action = flags[f.name]
        assert action.default == f.default, f.name  # type: ignore[attr-defined]
        assert action.help == f.metadata["help"], f.name  # type: ignore[attr-defined]
        want = choices_of(hints[f.name])
        assert (list(action.choices) if action.choices else None) == want, f.name  # type: ignore[attr-defined]
    assert "token" not in flags  # a secret: never a flag (the hub reads HF_TOKEN)
    assert flags["family"].choices == ["auto", "worldpm", "polar", "generic"]  # type: ignore[attr-defined]


def test_cli_arguments_become_the_same_model_config() -> None:
    from worldpm_reward.cli import _model_config

    args = build_parser().parse_args(
        [
            "score",
            "--model",
            "m",
            "--max-batch-tokens",
            "2048",
            "--overflow",
            "error",
            "--device",
            "cpu",
            "x",
            "-o",
            "y",
        ]
    )
    cfg = _model_config(args)
    assert cfg == ModelConfig(max_batch_tokens=2048, overflow="error", device="cpu")


def test_unknown_or_bad_options_are_named(tiny_worldpm: Path) -> None:
    with pytest.raises(TypeError, match=r"max_batch_token.*known options"):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", max_batch_token=10)
    with pytest.raises(ConfigError, match="overflow: 'clip'"):
        ModelConfig(overflow="clip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_padding_fraction"):
        ModelConfig(max_padding_fraction=1.5)
    with pytest.raises(ConfigError, match="max_batch_size"):
        ModelConfig(max_batch_size=0)


@pytest.mark.slow
def test_config_object_and_keywords_load_the_same_model(tiny_worldpm: Path) -> None:
    cfg = ModelConfig(device="cpu", max_batch_tokens=512, max_length=300)
    a = RewardModel.from_pretrained(tiny_worldpm, cfg)
    b = RewardModel.from_pretrained(tiny_worldpm, **dataclasses.asdict(cfg))
    c = RewardModel.from_pretrained(tiny_worldpm, cfg, max_length=200)  # keywords override the object
    assert a.config == b.config == cfg and (a.engine.max_batch_tokens, a.max_length) == (512, 300)
    assert c.max_length == 200 and c.engine.max_batch_tokens == 512
