"""Typed configs: :class:`ModelConfig` (every load and batching option, declared once) and
:func:`load_config`, which fills any config dataclass from a YAML file and ``key=value``
overrides.

``ModelConfig`` is the single declaration behind ``RewardModel.from_pretrained(**options)``,
the CLI's model flags (built from its fields: names, types, choices and help) and the
``model_kwargs`` of every adapter. Unknown keys and values of the wrong type are errors
that quote the key and the value, so a typo fails at once instead of after a 72B load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from worldpm_reward.errors import ConfigError, ConfigTypeError

T = TypeVar("T")

FamilyName = Literal["auto", "worldpm", "polar", "generic"]
Overflow = Literal["truncate", "error"]
EngineName = Literal["transformers", "vllm", "fsdp"]


def _opt(help: str, *, cli: bool = True, metavar: str | None = None) -> dict[str, Any]:
    return {"help": help, "cli": cli, "metavar": metavar}


@dataclass
class ModelConfig:
    """How a reward model is loaded and batched. Every field is also a CLI flag
    (``--max-batch-tokens`` for ``max_batch_tokens``) unless noted."""

    family: FamilyName = field(
        default="auto", metadata=_opt("checkpoint family (default: from config.json's architectures)")
    )
    engine: EngineName = field(
        default="transformers",
        metadata=_opt(
            "what runs the forward pass: 'transformers' (in this process) or 'vllm' (vLLM's pooling "
            "runner: in this process when vLLM imports here, else a `vllm serve` launched with "
            "--vllm-python, or one already running at --vllm-url); formatting, truncation, weight "
            "checks and shaping stay in this package either way; 'fsdp' (Python API under "
            "torch.distributed: one model sharded across the training ranks, see "
            "worldpm_reward.engines.sharded)"
        ),
    )
    vllm_url: str | None = field(
        default=None,
        metadata=_opt("engine=vllm: base URL of a running `vllm serve <checkpoint> --runner pooling`"),
    )
    vllm_python: str | None = field(
        default=None,
        metadata=_opt(
            "engine=vllm: the Python of a virtualenv where vLLM is installed; `vllm serve` is "
            "started from it on 127.0.0.1 and stopped with this process"
        ),
    )
    vllm_args: str | None = field(
        default=None,
        metadata=_opt(
            "engine=vllm: extra vLLM engine flags, e.g. '--tensor-parallel-size 4 "
            "--gpu-memory-utilization 0.9'"
        ),
    )
    vllm_startup_timeout: float = field(
        default=900.0, metadata=_opt("engine=vllm: seconds to wait for a launched vLLM to answer /health")
    )
    fsdp_offload: bool = field(
        default=False,
        metadata=_opt(
            "engine=fsdp: keep this rank's shard in CPU memory between reward calls (moved to the "
            "GPU for each call, off again after it)",
            cli=False,
        ),
    )
    dtype: str | None = field(
        default="auto", metadata=_opt("auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    )
    device: str | None = field(
        default=None, metadata=_opt("cuda, cuda:1, cpu (default: cuda when available)")
    )
    device_map: str | dict[str, Any] | None = field(
        default=None,
        metadata=_opt("'auto' shards a large model (WorldPM-72B: ~143 GB bf16) over all visible GPUs"),
    )
    attn_implementation: str | None = field(
        default=None, metadata=_opt("sdpa, eager, flash_attention_2 (default: transformers' choice)")
    )
    max_length: int | None = field(
        default=None,
        metadata=_opt(
            "most tokens per sample, the scored token included (default: the model's context; "
            "POLAR: 16384); longer samples lose tokens from their start and are flagged"
        ),
    )
    overflow: Overflow = field(
        default="truncate", metadata=_opt("over-long samples: 'truncate' (flagged) or 'error'")
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata=_opt(
            "padded-token budget per micro-batch (default 32768 on GPU; on CPU sized to the model, "
            "4096 at 0.5B dimensions in fp32 under the fused forward, else 1024; at most 4096)"
        ),
    )
    max_batch_size: int = field(default=64, metadata=_opt("most sequences per micro-batch"))
    max_padding_fraction: float | None = field(
        default=None,
        metadata=_opt(
            "most padding share per micro-batch (default 0.3 on GPU, 0.05 on CPU, where a padded "
            "position costs as much as a real one)"
        ),
    )
    shared_prefix: bool = field(
        default=True,
        metadata=_opt(
            "run a long prefix shared by several samples of one call (a GRPO group's prompt) once, "
            "through the KV cache; scores equal unshared scoring within float rounding "
            "(CLI: --no-shared-prefix turns it off)"
        ),
    )
    compile: bool = field(
        default=False,
        metadata=_opt(
            "engine=transformers: run the packed backbone under torch.compile (inductor, dynamic "
            "shapes; on CPU with weight freezing, so the weights must not change after loading). "
            "The first call compiles (minutes on a small CPU); if compiling fails the engine "
            "logs why and runs eagerly"
        ),
    )
    min_shared_prefix: int | None = field(
        default=None,
        metadata=_opt(
            "shortest shared prefix, in tokens, worth running once (default: 32, or more for models so "
            "small that the tokens skipped save less compute than the extra forward call costs)"
        ),
    )
    min_shared_group: int | None = field(
        default=None,
        metadata=_opt(
            "fewest samples sharing a prefix for it to run once (default 2 on CPU, 8 on GPU, where "
            "small groups were measured slower than plain batches)"
        ),
    )
    special_tokens_in_content: Literal["text", "literal"] = field(
        default="text",
        metadata=_opt(
            "'text': control-token strings inside message content (<|im_end|>, ...) are encoded "
            "as plain text, so a policy cannot forge turns; 'literal': as the model card's "
            "tokenizer call does (they become control tokens)"
        ),
    )
    strip_think: bool = field(
        default=False,
        metadata=_opt(
            "score assistant replies without their <think>...</think> reasoning (as POLAR's client "
            "does); an unclosed <think> leaves an empty answer"
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_opt(
            "run code shipped with the checkpoint (off; WorldPM never needs it, POLAR's tokenizer does)"
        ),
    )
    chat_template: str | None = field(
        default=None, metadata=_opt("override the checkpoint's chat template (a Jinja string)", cli=False)
    )
    revision: str | None = field(default=None, metadata=_opt("hub revision (branch, tag or commit)"))
    token: str | None = field(
        default=None, metadata=_opt("hub token (the CLI uses HF_TOKEN from the environment)", cli=False)
    )

    def __post_init__(self) -> None:
        if self.family not in typing.get_args(FamilyName):
            raise ConfigError(f"family: {self.family!r} is not one of {list(typing.get_args(FamilyName))}")
        if self.engine not in typing.get_args(EngineName):
            raise ConfigError(f"engine: {self.engine!r} is not one of {list(typing.get_args(EngineName))}")
        if self.engine != "vllm" and (self.vllm_url or self.vllm_python):
            raise ConfigError("vllm_url / vllm_python: only used with engine='vllm'")
        if self.fsdp_offload and self.engine != "fsdp":
            raise ConfigError("fsdp_offload: only used with engine='fsdp'")
        if self.compile and self.engine != "transformers":
            raise ConfigError(f"compile: only used with engine='transformers', not {self.engine!r}")
        if self.vllm_url and self.vllm_python:
            raise ConfigError("vllm_url and vllm_python: give one (a running vLLM, or one to launch)")
        if self.overflow not in typing.get_args(Overflow):
            raise ConfigError(f"overflow: {self.overflow!r} is not one of {list(typing.get_args(Overflow))}")
        for name in ("max_length", "max_batch_tokens", "max_batch_size", "min_shared_prefix"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length: must be at least 2, got {self.max_length}")
        if self.min_shared_group is not None and (
            not isinstance(self.min_shared_group, int) or self.min_shared_group < 2
        ):
            raise ConfigError(f"min_shared_group: expected an integer >= 2, got {self.min_shared_group!r}")
        f = self.max_padding_fraction
        if f is not None and not 0.0 <= f <= 1.0:
            raise ConfigError(f"max_padding_fraction: must be within [0, 1], got {f!r}")

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any] | None = None, **more: Any) -> ModelConfig:
        """Build from keyword options (``model_kwargs``); an unknown key names the known ones."""
        values = {**dict(options or {}), **more}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigTypeError(f"unknown reward-model option(s) {unknown}; known options: {sorted(known)}")
        dtype = values.get("dtype")
        if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":  # torch.bfloat16 etc.
            values["dtype"] = str(dtype).removeprefix("torch.")
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in {"revision": self.revision, "token": self.token}.items() if v is not None}


def cli_fields(cls: type[Any] = ModelConfig) -> list[dataclasses.Field[Any]]:
    """The fields of a config dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def choices_of(hint: Any) -> list[Any] | None:
    """The allowed values of a ``Literal`` (or ``Literal | None``) type, else None."""
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return list(typing.get_args(arg))
    return None


# -- YAML + key=value configs (recipes) ----------------------------------------------------


def _check(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    if origin in (list, Sequence) or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        return [_check(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value")
    return key.strip(), yaml.safe_load(raw)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides (YAML values)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(dict(_parse_override(o) for o in overrides))
    if not dataclasses.is_dataclass(cls):
        raise ConfigTypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {k: _check(k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)  # type: ignore[return-value]
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(str(exc)) from exc
