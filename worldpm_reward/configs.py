"""Typed configs for recipes: a dataclass, filled from a YAML file and ``key=value`` overrides.

Unknown keys and values of the wrong type are errors that quote the key and the value, so a
typo in a launch command fails at once instead of after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is not what its dataclass field expects."""


def _check(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
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
    assert dataclasses.is_dataclass(cls)
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
