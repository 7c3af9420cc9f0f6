"""Checkpoint files: config and tensor listings, strict weight-layout checks, dtype and placement.

Nothing here knows a model family. Families (:mod:`worldpm_reward.families`) use these to
compare a checkpoint's tensor names and shapes with the module they build BEFORE any
weight is read (cheap even for 72B: only the safetensors headers and index are read), and
transformers' own loading report after. A missing, unexpected or misshaped weight is a
:class:`CheckpointError` listing the names; a head is never initialised at random.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worldpm_reward.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: Weights a checkpoint may carry that a reward model does not use.
IGNORABLE_WEIGHTS = (
    re.compile(r"^lm_head\."),
    re.compile(r"^output\.weight$"),
    re.compile(r"rotary_emb\.inv_freq$"),
)

Shapes = dict[str, tuple[int, ...]]
#: Extra advice for a layout mismatch: (found tensors, missing names) -> a sentence or None.
LayoutHint = Callable[[dict[str, tuple[int, ...] | None], set[str]], str | None]


@dataclass
class LoadRequest:
    """Everything a family's loader needs, resolved once by :func:`worldpm_reward.families.load`.

    Attributes:
        name_or_path: hub id or local directory.
        config_dict: the checkpoint's config.json, as a dict.
        dtype: the resolved torch dtype of the weights.
        device: where to put the whole model (None when ``device_map`` places it).
        device_map: accelerate device map ("auto", "balanced", {"": "cuda:0"}, ...) or None.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... or None (transformers' default).
        trust_remote_code: whether code shipped with the checkpoint may run.
        hub_kwargs: ``revision`` / ``token`` for the hub.
    """

    name_or_path: str
    config_dict: dict[str, Any]
    dtype: torch.dtype
    device: str | torch.device | None
    device_map: str | dict[str, Any] | None
    attn_implementation: str | None
    trust_remote_code: bool
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"checkpoint {self.name_or_path!r}"

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``from_pretrained`` (loading report included)."""
        kwargs: dict[str, Any] = {"dtype": self.dtype, "output_loading_info": True, **self.hub_kwargs}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    """``None``/"auto": bfloat16 on a GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_gpu = device is not None and str(device).startswith("cuda")
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_config_dict(name_or_path: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path), **hub_kwargs)
    except OSError as exc:
        raise CheckpointError(f"cannot read config.json of {str(name_or_path)!r}: {exc}") from exc
    return config_dict


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


def local_checkpoint_dir(name_or_path: str | os.PathLike[str], **hub_kwargs: Any) -> Path:
    """A local directory holding the checkpoint (a hub id is downloaded, or read from the cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), **hub_kwargs))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a local checkpoint directory, without reading the
    weights: safetensors headers, or a ``pytorch_model*.bin`` memory-mapped."""
    from safetensors import safe_open

    shards = sorted(path.glob("model*.safetensors"))
    if shards:
        out: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[key] = tuple(f.get_slice(key).get_shape())
        return out
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return {
            k: tuple(v.shape)
            for b in bins
            for k, v in torch.load(b, map_location="meta", weights_only=True, mmap=True).items()
        }
    raise CheckpointError(f"{path} holds no model*.safetensors or pytorch_model*.bin weights")


class TensorRows:
    """Reads a range of rows (dim 0) of any tensor of a local safetensors checkpoint, and only
    those bytes (safetensors slices are memory-mapped): how a sharded loader gives each rank
    its own slice without any rank reading the whole model.

    ``elements_read`` counts the elements returned so far (what this process has read).
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        shards = sorted(path.glob("model*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{path} holds no model*.safetensors weights; a sharded load reads slices of "
                "safetensors files (convert .bin weights with save_pretrained(safe_serialization=True))"
            )
        self._handles = [safe_open(str(s), framework="pt") for s in shards]
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118
        self.elements_read = 0

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the whole tensor when it has no dimension)."""
        handle = self._where.get(name)
        if handle is None:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}")
        piece = handle.get_slice(name)
        out = piece[start:stop] if piece.get_shape() else handle.get_tensor(name)
        self.elements_read += out.numel()
        return out


def skeleton_shapes(build: Callable[[], nn.Module]) -> Shapes:
    """Tensor names and shapes of a module built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        skeleton = build()
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def _ignorable(name: str) -> bool:
    return any(p.search(name) for p in IGNORABLE_WEIGHTS)


def _fmt(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_weight_names(
    found: dict[str, tuple[int, ...] | None],
    expected: Shapes,
    where: str,
    hint: LayoutHint | None = None,
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
    advice = hint(found, missing) if hint is not None else None
    if advice:
        lines.append(advice)
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


def place(model: nn.Module, request: LoadRequest, no_split: list[str]) -> nn.Module:
    """Put a model built outside ``from_pretrained`` where ``request`` says.

    ``device_map`` ("auto", "balanced", "sequential" or an explicit dict) goes through
    accelerate exactly as transformers' ``from_pretrained`` does it, never splitting the
    module classes in ``no_split`` (decoder layers); otherwise the model moves to ``device``.
    """
    if request.device_map is None:
        return model.to(request.device) if request.device is not None else model
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = request.device_map
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            device_map = {"": device_map}  # a single device, e.g. "cuda:1" or "cpu"
        else:
            max_memory = None
            if device_map != "sequential":
                max_memory = get_balanced_memory(
                    model,
                    dtype=request.dtype,
                    no_split_module_classes=no_split,
                    low_zero=device_map == "balanced_low_0",
                )
            device_map = infer_auto_device_map(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=request.dtype
            )
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)  # type: ignore[assignment]  # as from_pretrained sets it
    return model
