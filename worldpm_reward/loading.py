"""Load reward-model checkpoints faithfully, or refuse loudly.

Three families:
  * ``worldpm``: ``architectures: ["Qwen2ForRewardModel"]`` (WorldPM-72B and fine-tunes,
    Qwen2.5-Math-RM layout). Built with :class:`WorldPMForRewardModel`; the ``auto_map``
    to remote code in the real config is never followed.
  * ``generic``: any single-output ``*ForSequenceClassification`` reward model, through
    transformers' own classes.
  * ``polar``: ``InternLM2ForRewardModel`` (POLAR), mapped natively onto ``LlamaModel``
    (see :mod:`worldpm_reward.polar`).

Before any weight is read, the checkpoint's tensor names are compared with the module's
(cheap even for 72B), and after loading transformers' own loading report is checked:
a missing or unexpected weight is a :class:`CheckpointError` listing the names. A head is
never initialised at random.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from worldpm_reward.errors import CheckpointError

logger = logging.getLogger(__name__)

Family = Literal["worldpm", "generic", "polar"]
FAMILIES: tuple[str, ...] = ("auto", "worldpm", "generic", "polar")

WORLDPM_ARCHITECTURES = ("Qwen2ForRewardModel",)
POLAR_ARCHITECTURES = ("InternLM2ForRewardModel",)
#: Weights a checkpoint may carry that the reward model does not use.
IGNORABLE_WEIGHTS = (
    re.compile(r"^lm_head\."),
    re.compile(r"^output\.weight$"),
    re.compile(r"rotary_emb\.inv_freq$"),
)


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Any
    family: Family
    config: Any


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    """``None``/"auto": bfloat16 on a GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_gpu = device is not None and str(device).startswith("cuda")
        return torch.bfloat16 if on_gpu else torch.float32
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto'; got {dtype!r}")
    return names[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_config_dict(name_or_path: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path), **hub_kwargs)
    except OSError as exc:
        raise CheckpointError(f"cannot read config.json of {str(name_or_path)!r}: {exc}") from exc
    return config_dict


def detect_family(config_dict: dict[str, Any]) -> Family:
    archs = config_dict.get("architectures") or []
    if any(a in WORLDPM_ARCHITECTURES for a in archs):
        return "worldpm"
    if any(a in POLAR_ARCHITECTURES for a in archs):
        return "polar"
    return "generic"


def checkpoint_tensors(
    name_or_path: str | os.PathLike[str], **hub_kwargs: Any
) -> dict[str, tuple[int, ...] | None]:
    """Names (and shapes, where cheap) of the tensors in a safetensors checkpoint.

    Reads only ``model.safetensors.index.json`` and safetensors headers. Returns {} when
    the checkpoint is not in safetensors form (the post-load check still applies).
    """
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        local = Path(name_or_path) / filename
        if local.is_file():
            return str(local)
        if Path(name_or_path).is_dir():
            return None
        try:
            return cached_file(
                str(name_or_path), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        except OSError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        tensors: dict[str, tuple[int, ...] | None] = dict.fromkeys(weight_map)
        if Path(name_or_path).is_dir():  # shapes from local shard headers
            for shard in sorted(set(weight_map.values())):
                with safe_open(str(Path(name_or_path) / shard), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        tensors[key] = tuple(f.get_slice(key).get_shape())
        return tensors
    single = fetch("model.safetensors")
    if single is None:
        return {}
    with safe_open(single, framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _ignorable(name: str) -> bool:
    return any(p.search(name) for p in IGNORABLE_WEIGHTS)


def _fmt(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_weight_names(
    found: dict[str, tuple[int, ...] | None], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise CheckpointError when the checkpoint's weights do not match the module's exactly."""
    missing = set(expected) - set(found)
    unexpected = {k for k in set(found) - set(expected) if not _ignorable(k)}
    misshaped = {
        k: (found[k], expected[k])
        for k in set(found) & set(expected)
        if found[k] is not None and tuple(found[k] or ()) != tuple(expected[k])
    }
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{where} does not match the reward model's weight layout; refusing to load it."]
    if "score.weight" in found and any(k.startswith("score.0.") for k in missing):
        lines.append(
            "It has a single-Linear head ('score.weight', the stock AutoModelForSequenceClassification "
            "layout), but WorldPM's head is score.0 (Linear h->h) -> ReLU -> score.2 (Linear h->1). "
            "A single-Linear head would score garbage; if this really is a generic classifier reward "
            "model, load it with family='generic'."
        )
    if missing:
        lines.append(f"Missing weights ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"Unexpected weights ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        lines.append(
            "Wrong shapes: "
            + "; ".join(
                f"{k} has {list(s or ())} but needs {list(e)}" for k, (s, e) in sorted(misshaped.items())
            )
        )
    raise CheckpointError("\n".join(lines))


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Raise on transformers' own report of missing/unexpected/mismatched weights."""
    missing = set(info.get("missing_keys") or ())
    unexpected = {k for k in (info.get("unexpected_keys") or ()) if not _ignorable(k)}
    mismatched = info.get("mismatched_keys") or ()
    if missing or unexpected or mismatched:
        parts = [f"{where}: transformers reported weights that do not match the model; refusing to use it."]
        if missing:
            parts.append(f"Missing (would be randomly initialised): {_fmt(missing)}")
        if unexpected:
            parts.append(f"Unexpected: {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"Mismatched shapes: {_fmt(str(m) for m in mismatched)}")
        raise CheckpointError("\n".join(parts))


def _from_pretrained_kwargs(
    dtype: torch.dtype, device_map: Any, attn_implementation: str | None, hub_kwargs: dict[str, Any]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, **hub_kwargs}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    family: str = "auto",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> LoadedCheckpoint:
    """Load model + tokenizer, with weight checks. See the module docstring."""
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    hub_kwargs: dict[str, Any] = {
        k: v for k, v in {"revision": revision, "token": token}.items() if v is not None
    }
    where = f"checkpoint {str(name_or_path)!r}"
    config_dict = read_config_dict(name_or_path, **hub_kwargs)
    fam: Family = detect_family(config_dict) if family == "auto" else family  # type: ignore[assignment]
    if device_map is None and device is None:
        device = default_device()
    torch_dtype = resolve_dtype(
        dtype, device if device_map is None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    kwargs = _from_pretrained_kwargs(torch_dtype, device_map, attn_implementation, hub_kwargs)

    if fam == "polar":
        from worldpm_reward.polar import load_polar

        model: nn.Module = load_polar(name_or_path, config_dict, torch_dtype, hub_kwargs)
    elif fam == "worldpm":
        model = _load_worldpm(name_or_path, config_dict, kwargs, hub_kwargs, where)
    else:
        model = _load_generic(name_or_path, config_dict, kwargs, hub_kwargs, trust_remote_code, where)
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code, **hub_kwargs
    )
    logger.info("loaded %s as family=%s dtype=%s", where, fam, torch_dtype)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, family=fam, config=model.config)


def _load_worldpm(
    name_or_path: str | os.PathLike[str],
    config_dict: dict[str, Any],
    kwargs: dict[str, Any],
    hub_kwargs: dict[str, Any],
    where: str,
) -> nn.Module:
    from transformers import Qwen2Config

    from worldpm_reward.modeling import WorldPMForRewardModel

    # Build the config from the dict ourselves: the real config's auto_map points at remote
    # code and its model_type may not be "qwen2"; neither must matter here.
    clean = {
        k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type", "transformers_version")
    }
    config = Qwen2Config(**clean)
    config.use_cache = False
    config.architectures = list(WORLDPM_ARCHITECTURES)
    with torch.device("meta"):
        skeleton = WorldPMForRewardModel(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    found = checkpoint_tensors(name_or_path, **hub_kwargs)
    if found:
        check_weight_names(found, expected, where)
    else:
        logger.warning("%s has no safetensors index; relying on the post-load weight check", where)
    loaded: Any = WorldPMForRewardModel.from_pretrained(str(name_or_path), config=config, **kwargs)
    model, info = loaded
    check_loading_info(info, where)
    return model


def _load_generic(
    name_or_path: str | os.PathLike[str],
    config_dict: dict[str, Any],
    kwargs: dict[str, Any],
    hub_kwargs: dict[str, Any],
    trust_remote_code: bool,
    where: str,
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    archs = config_dict.get("architectures") or []
    is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if not is_classifier and "id2label" not in config_dict and "num_labels" not in config_dict:
        raise CheckpointError(
            f"{where} (architectures {archs}) is not a sequence-classification reward model: its config "
            "has no id2label/num_labels, so a classification head would be created at random. "
            "WorldPM checkpoints need family='worldpm' (or 'auto')."
        )
    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **hub_kwargs)
    if getattr(config, "num_labels", 1) != 1:
        raise CheckpointError(
            f"{where} is a classifier with num_labels={config.num_labels}; a reward model has one output. "
            "Pass a single-output reward model."
        )
    found = checkpoint_tensors(name_or_path, **hub_kwargs)
    if found:
        with torch.device("meta"):
            skeleton = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=trust_remote_code
            )
        check_weight_names(found, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, where)
        del skeleton
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), config=config, trust_remote_code=trust_remote_code, **kwargs
    )
    check_loading_info(info, where)
    return model
