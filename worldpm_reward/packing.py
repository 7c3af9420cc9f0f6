"""Packed rows: several sequences in one row of a micro-batch, no padding between them.

A row holds *blocks* back to back. A block is either one sequence scored on its own, or a
shared prefix (a GRPO group's prompt) followed by the suffixes that continue it. Every token
gets the position it has in its own full sequence (a suffix continues from its prefix's
length) and a block-structured causal mask: a token attends to the earlier tokens of its own
segment and, for a suffix, to its prefix; to nothing else in the row. So each sequence
computes exactly what it computes alone (up to float summation order), its prefix is run
once per row instead of once per sample, and the score is read at each sequence's own last
token. Only the end of a row is padding.

The mask is a 4-D tensor handed to the backbone as its ``attention_mask``; transformers (5.9
and later) passes such a mask to the attention layers as it is, so this works for the
``sdpa`` (boolean mask) and ``eager`` (additive float mask) attention implementations of
decoders whose layers all use full attention (:func:`packing_support`).

Attention over a whole row under that mask computes every masked block too. On CPU the engine
instead gives the models it loads :data:`SEGMENT_ATTENTION`, an attention implementation
registered with transformers: handed the row's segment spans (``worldpm_spans``), it runs
sdpa once per segment over just that segment's keys (causal, with its prefix's keys before
them), so a row costs what its sequences cost alone and rows can be as wide as a whole
micro-batch with no padding. Called without spans (any other caller of the model) it is
transformers' own sdpa, mask and all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worldpm_reward.pooling import head_device

#: Decoder backbones (config.model_type) whose transformers forward hands a 4-D attention mask
#: and explicit position_ids to every layer unchanged and rotates by those positions.
PACKABLE_MODEL_TYPES = frozenset({"qwen2", "llama", "qwen3", "mistral"})
#: The attention implementation :func:`segment_attention` is registered under.
SEGMENT_ATTENTION = "worldpm_segments"
#: Attention implementations whose mask format :func:`block_mask` builds.
PACKABLE_ATTENTION = frozenset({"sdpa", "eager", SEGMENT_ATTENTION})


@dataclass(frozen=True)
class Block:
    """What a row holds back to back: ``prefix`` (empty for a lone sequence) then ``suffixes``,
    each ``(key, token ids)``; a suffix's full sequence is ``prefix + ids``, scored at its last
    token and reported under ``key``."""

    prefix: Sequence[int]
    suffixes: Sequence[tuple[int, Sequence[int]]]

    @property
    def length(self) -> int:
        """Positions the block takes in a row."""
        return len(self.prefix) + sum(len(ids) for _, ids in self.suffixes)


@dataclass
class PackedBatch:
    """A micro-batch of packed rows (R rows of C positions).

    input_ids, position_ids, segments: (R, C) int64. ``segments`` numbers each token's
    segment (a prefix, a suffix or a lone sequence) uniquely within its row; padding is -1.
    ``parents``: (R, C), the segment each token's segment continues (its prefix), else -2.
    ``score_rows`` / ``score_cols``: (N,), where each scored sequence's last token is, in the
    order of ``keys``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    parents: torch.Tensor
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    keys: list[int] = field(default_factory=list)
    real_tokens: int = 0
    #: per row, each segment as (start, end, prefix start, prefix end) columns; the prefix range
    #: is empty for a prefix or a lone sequence (what :func:`segment_attention` runs)
    spans: list[list[tuple[int, int, int, int]]] = field(default_factory=list)

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack(rows: Sequence[Sequence[Block]], pad_token_id: int) -> PackedBatch:
    """Lay blocks out in rows (each row as long as the longest one; the rest is padding)."""
    width = max(sum(b.length for b in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    par = torch.full(shape, -2, dtype=torch.long)
    keys: list[int] = []
    where: list[tuple[int, int]] = []
    spans: list[list[tuple[int, int, int, int]]] = []
    real = 0
    for r, row in enumerate(rows):
        col, n = 0, 0
        row_spans: list[tuple[int, int, int, int]] = []
        for block in row:
            p = len(block.prefix)
            prefix_seg, prefix_col = n, col
            if p:
                ids[r, col : col + p] = torch.as_tensor(block.prefix, dtype=torch.long)
                pos[r, col : col + p] = torch.arange(p)
                seg[r, col : col + p] = prefix_seg
                row_spans.append((col, col + p, 0, 0))
                col, n = col + p, n + 1
            for key, suffix in block.suffixes:
                s = len(suffix)
                ids[r, col : col + s] = torch.as_tensor(suffix, dtype=torch.long)
                pos[r, col : col + s] = torch.arange(p, p + s)
                seg[r, col : col + s] = n
                if p:
                    par[r, col : col + s] = prefix_seg
                row_spans.append((col, col + s, prefix_col, prefix_col + p))
                col, n = col + s, n + 1
                keys.append(key)
                where.append((r, col - 1))
        pos[r, col:] = torch.arange(width - col)  # padding: its own causal run, never read
        spans.append(row_spans)
        real += col
    return PackedBatch(
        input_ids=ids,
        position_ids=pos,
        segments=seg,
        parents=par,
        score_rows=torch.as_tensor([r for r, _ in where], dtype=torch.long),
        score_cols=torch.as_tensor([c for _, c in where], dtype=torch.long),
        keys=keys,
        real_tokens=real,
        spans=spans,
    )


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of packed rows one segment at a time (:data:`SEGMENT_ATTENTION`).

    With ``worldpm_spans`` (:attr:`PackedBatch.spans`), each segment's queries attend causally
    to its own keys, after all of its prefix's keys when it has one: sdpa over exactly the
    blocks :func:`block_mask` allows, none of the masked ones. Positions outside every span
    (end-of-row padding) get zeros. Without spans this is transformers' sdpa attention,
    unchanged. query (R, H, C, D), key/value (R, KV heads, C, D); returns (R, C, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = kwargs.pop("worldpm_spans", None)
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if len(spans) != query.shape[0]:
        raise ValueError(f"worldpm_spans covers {len(spans)} rows, the batch has {query.shape[0]}")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = query.shape[1] != key.shape[1]
    out = query.new_zeros(query.shape)
    for r, row in enumerate(spans):
        q_row, k_row, v_row = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        for start, end, prefix_start, prefix_end in row:
            q = q_row[:, :, start:end]
            if prefix_end > prefix_start:
                k = torch.cat((k_row[:, :, prefix_start:prefix_end], k_row[:, :, start:end]), dim=2)
                v = torch.cat((v_row[:, :, prefix_start:prefix_end], v_row[:, :, start:end]), dim=2)
                length, shared = end - start, prefix_end - prefix_start
                mask = torch.ones(length, shared + length, dtype=torch.bool, device=q.device).tril(shared)
                o = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            else:
                k, v = k_row[:, :, start:end], v_row[:, :, start:end]
                o = sdpa(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            out[r : r + 1, :, start:end] = o
    return out.transpose(1, 2), None


@functools.cache
def register_segment_attention() -> str:
    """Register :func:`segment_attention` (and sdpa's mask builder, for calls without spans)
    with transformers under :data:`SEGMENT_ATTENTION`; returns that name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    return SEGMENT_ATTENTION


def block_mask(segments: torch.Tensor, parents: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The (R, 1, C, C) attention mask of packed rows: query q sees key k iff k <= q and k is in
    q's segment or in the prefix q's segment continues. ``kind`` "sdpa": boolean (True =
    attend); "eager": additive, 0 or the dtype's minimum."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k_seg == q_seg) | (k_seg == parents[:, :, None]))
    allowed = allowed[:, None]
    if kind == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def packing_support(backbone: Any, max_length: int | None = None) -> str | None:
    """Why ``backbone`` cannot run packed rows of sequences up to ``max_length`` tokens (a
    sentence), or None when it can."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(PACKABLE_MODEL_TYPES)}"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in PACKABLE_ATTENTION:
        return f"attn_implementation {attention!r} is not one of {sorted(PACKABLE_ATTENTION)}"
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
        return "some layers use sliding-window attention"
    # Mistral applies a set sliding_window in every layer (each query sees only its last
    # sliding_window keys, which the block mask would not apply), whatever a stray
    # use_sliding_window in its config says; Qwen2/Qwen3 apply it only where that flag is on
    # (their layer_types, checked above). A sequence no longer than the window is unaffected.
    window = getattr(config, "sliding_window", None)
    flag = getattr(config, "use_sliding_window", None)
    if (
        window is not None
        and (model_type == "mistral" or flag is None or flag)
        and (max_length is None or max_length > window)
    ):
        return f"sliding-window attention (sliding_window={window}) over samples of up to {max_length} tokens"
    return None


def score_packed(
    backbone: Any,
    head: nn.Module,
    batch: PackedBatch,
    device: torch.device,
    forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Raw scores (N,) of the packed sequences, in the order of ``batch.keys``, in the head's dtype.
    ``forward``: what runs the backbone (e.g. its ``torch.compile``'d form), else the backbone.
    A backbone under :data:`SEGMENT_ATTENTION` run eagerly gets the rows' spans, and the block
    mask too (what any other attention would need)."""
    attention = backbone.config._attn_implementation
    kind = "eager" if attention == "eager" else "sdpa"
    segments = batch.segments.to(device)
    mask = block_mask(segments, batch.parents.to(device), kind, backbone.dtype)
    extra: dict[str, Any] = {}
    if attention == SEGMENT_ATTENTION and forward is None:
        extra["worldpm_spans"] = batch.spans
    hidden = (backbone if forward is None else forward)(
        input_ids=batch.input_ids.to(device),
        attention_mask=mask,
        position_ids=batch.position_ids.to(device),
        use_cache=False,
        **extra,
    ).last_hidden_state
    pooled = hidden[batch.score_rows.to(hidden.device), batch.score_cols.to(hidden.device)]
    return head(pooled.to(head_device(head))).squeeze(-1)
