"""POLAR (internlm/POLAR-1_8B, POLAR-7B and -Base): reference-based reward models, natively.

This module holds everything POLAR-specific: the architecture, checkpoint conversion and
loading, the input encoding and the published known answers.

Architecture ``InternLM2ForRewardModel`` (remote code upstream): an InternLM2 backbone and
``v_head = Linear(h, 1, bias=False)`` on the last token. InternLM2 is Llama with renamed
weights and a FUSED ``wqkv`` projection, so the checkpoint is mapped onto transformers'
own ``LlamaModel``: no remote code runs for the model.

``wqkv`` layout: rows are grouped per key/value head, each group holding that head's
``q_per_kv`` query heads, then its key head, then its value head (``head_dim`` rows each),
which is what InternLM2's ``rearrange(qkv, "b q (h gs d) -> b q h gs d")`` reads.

Input encoding (xtuner's ``RewardModelClient``, POLAR's reference client): prompt, reference
and output are texts (message contents joined by "\\n", roles dropped); each is tokenized
(with BOS) to apply the length caps, then decoded back; the model reads
``prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + output + "[UNUSED_TOKEN_130]"``
tokenized with BOS, and its score is the head's value at the final reward token. Caps:
reference and output at most ``max_response_length`` (4096) tokens each, keeping their
END; the prompt at most ``(max_length - 4 - len(ref) - len(out)) // 2`` tokens, keeping its
end (it appears twice). That is the client exactly where its caps leave the prompt a
budget (``max_length`` > 8196; its default and this package's is 16384); under a smaller
``max_length`` the reference and output caps shrink to ``(max_length - 4) // 4`` each (the
client's default proportions), so the input fits ``max_length``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from worldpm_reward.checkpoints import LoadRequest, check_weight_names, local_checkpoint_dir, place
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import Encoded, Encoder, plain_turns
from worldpm_reward.errors import CheckpointError, SampleError
from worldpm_reward.families.base import KnownAnswer, RewardFamily
from worldpm_reward.pooling import score_last_token
from worldpm_reward.samples import Conversation, Sample

logger = logging.getLogger(__name__)

ARCHITECTURES = ("InternLM2ForRewardModel",)
REWARD_SEPARATOR = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def llama_config_from_internlm2(cfg: dict[str, Any]) -> LlamaConfig:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:  # InternLM2 uses {"type": "dynamic", "factor": f}: dynamic NTK, as transformers' "dynamic"
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else None
        if kind not in ("dynamic", "linear"):  # InternLM2's own modeling code knows only these two
            raise CheckpointError(
                f"config.json: rope_scaling type {kind!r} is not one InternLM2 (POLAR) knows; its modeling "
                "code scales RoPE only as 'dynamic' (NTK) or 'linear'"
            )
        rope = {**rope, "rope_type": kind, "factor": scaling.get("factor", 1.0)}
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False,
        hidden_act=cfg.get("hidden_act", "silu"),
        tie_word_embeddings=False,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        use_cache=False,
    )
    config.reward_token_id = cfg.get("reward_token_id")
    config.architectures = ["InternLM2ForRewardModel"]
    return config


class PolarRewardModel(LlamaPreTrainedModel):
    """InternLM2 backbone (as LlamaModel) + ``v_head`` on the last real token; returns raw scores (B,)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return score_last_token(self.model, self.v_head, input_ids, attention_mask)


def expected_internlm2_weights(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes an InternLM2ForRewardModel checkpoint must hold."""
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = h // heads
    out: dict[str, tuple[int, ...]] = {
        "model.tok_embeddings.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
        "v_head.weight": (1, h),
    }
    for i in range(n):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * d, h)
        out[p + "attention.wo.weight"] = (h, heads * d)
        if cfg.get("bias"):
            out[p + "attention.wqkv.bias"] = ((heads + 2 * kv) * d,)
            out[p + "attention.wo.bias"] = (h,)
        out[p + "attention_norm.weight"] = (h,)
        out[p + "ffn_norm.weight"] = (h,)
        out[p + "feed_forward.w1.weight"] = (inter, h)
        out[p + "feed_forward.w3.weight"] = (inter, h)
        out[p + "feed_forward.w2.weight"] = (h, inter)
    return out


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Fused InternLM2 wqkv (weight or bias) -> (q, k, v) in Llama's head order."""
    groups = heads // kv_heads
    rest = w.shape[1:]
    grouped = w.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(heads * head_dim, *rest)
    k = grouped[:, groups].reshape(kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *rest)
    return q, k, v


_RENAME = {
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def convert_internlm2_state_dict(
    weights: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """InternLM2ForRewardModel tensor names -> PolarRewardModel (Llama) names."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg["hidden_size"] // heads
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name in ("model.norm.weight", "v_head.weight"):
            out[name] = t
        elif m := _LAYER.match(name):
            i, rest = m.groups()
            p = f"model.layers.{i}."
            if rest.startswith("attention.wqkv."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = split_wqkv(t, heads, kv, d)
                out[p + f"self_attn.q_proj.{kind}"], out[p + f"self_attn.k_proj.{kind}"] = q, k
                out[p + f"self_attn.v_proj.{kind}"] = v
            else:
                module, kind = rest.rsplit(".", 1)
                out[p + f"{_RENAME[module]}.{kind}"] = t
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors.index.json").is_file():
        shards = sorted(
            set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
        )
        return {k: v for s in shards for k, v in load_file(str(path / s)).items()}
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin.index.json").is_file():
        shards = sorted(
            set(json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"].values())
        )
        return {
            k: v
            for s in shards
            for k, v in torch.load(path / s, map_location="cpu", weights_only=True).items()
        }
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(
        f"{path} holds no model.safetensors / pytorch_model.bin weights (or their shard index)"
    )


def load_polar(request: LoadRequest) -> PolarRewardModel:
    """Build PolarRewardModel from an InternLM2ForRewardModel checkpoint; refuse any weight mismatch.

    Honours ``dtype``, ``attn_implementation`` and ``device``/``device_map`` like
    transformers' ``from_pretrained`` (a ``device_map`` is dispatched by accelerate, never
    splitting a decoder layer).
    """
    path = local_checkpoint_dir(request.name_or_path, **request.hub_kwargs)
    weights = _read_weights(path)
    expected = expected_internlm2_weights(request.config_dict)
    check_weight_names({k: tuple(v.shape) for k, v in weights.items()}, expected, request.where)
    config = llama_config_from_internlm2(request.config_dict)
    if request.attn_implementation is not None:
        config._attn_implementation = request.attn_implementation
    with torch.device("meta"):
        model = PolarRewardModel(config)
    converted = {
        k: v.to(request.dtype) for k, v in convert_internlm2_state_dict(weights, request.config_dict).items()
    }
    del weights
    model.load_state_dict(converted, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # rebuild the non-persistent buffers
    return place(model, request, ["LlamaDecoderLayer"])  # type: ignore[return-value]


class PolarEncoder(Encoder):
    """POLAR's input encoding (see the module docstring) with per-sample errors in place.

    Args:
        tokenizer: the checkpoint's tokenizer (adds BOS with add_special_tokens=True).
        max_length: total token budget (16384 in the reference client).
        max_response_length: cap for the reference and for the output (4096).
        reward_token_id: id of "[UNUSED_TOKEN_130]" (config.reward_token_id).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int = 16384,
        max_response_length: int = 4096,
        reward_token_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_response_length = max_response_length
        tid = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if tid is None or tokenizer.convert_ids_to_tokens(int(tid)) != REWARD_TOKEN:
            raise CheckpointError(f"the tokenizer has no {REWARD_TOKEN!r} token, POLAR's scored token")
        if reward_token_id is not None and int(tid) != int(reward_token_id):
            raise CheckpointError(
                f"{REWARD_TOKEN!r} is id {tid} in the tokenizer but reward_token_id={reward_token_id} in the config"
            )
        sep = tokenizer.convert_tokens_to_ids(REWARD_SEPARATOR)
        if sep is None or tokenizer.convert_ids_to_tokens(int(sep)) != REWARD_SEPARATOR:
            raise CheckpointError(f"the tokenizer has no {REWARD_SEPARATOR!r} token")
        self.final_token_id = int(tid)

    #: How far past ``max_length`` an encoding may go. The reference client's budget counts a
    #: BOS in each of its pieces, so a sample whose pieces are all cut (their BOS with them)
    #: comes out one token longer (4% of real samples at max_length=128; never more in 3,000
    #: fuzzed ones). Re-tokenizing the joined text can add more: a cut inside a character
    #: leaves stray bytes that decode to U+FFFD, which byte fallback may encode as 3 tokens
    #: each, at four cut pieces (the prompt twice), plus a token at each join: a margin of 32
    #: covers that. Faithful to the client; the engines size their limits by
    #: :attr:`max_tokens`, and a sample past it is that sample's error on every engine.
    OVERSHOOT = 32

    @property
    def max_tokens(self) -> int:
        return self.max_length + self.OVERSHOOT

    def _cap(self, ids: list[int], limit: int) -> tuple[list[int], int]:
        return (ids[-limit:], len(ids) - limit) if len(ids) > limit else (ids, 0)

    def text(self, sample: Sample) -> tuple[str, int, bool]:
        """The model's input text, tokens cut, and whether the output itself was cut."""
        if sample.reference is None:
            raise SampleError(
                "POLAR scores a response against a reference answer; this sample has none (OpenRLHF "
                "labels and veRL ground_truth count as one only as non-blank text or a message list, "
                "not as a number)",
                field="reference",
            )
        tok = self.tokenizer
        sample = plain_turns(sample)  # tool calls and results: their own turns, as text
        p = "\n".join(m["content"] for m in sample.prompt_messages)
        p_ids = tok.encode(p, add_special_tokens=True)
        # The reference client's caps leave its prompt a budget (2 x 4096 + 4 < 16384). Where
        # they would not, they shrink to a quarter of the budget each, the client's default
        # proportions, so that the input still fits max_length (the client's own slicing keeps
        # a prompt past its budget there).
        cap = self.max_response_length
        if 2 * cap + 4 >= self.max_length:
            cap = max(1, (self.max_length - 4) // 4)
        r1_ids, cut1 = self._cap(tok.encode(sample.reference, add_special_tokens=True), cap)
        r2_ids, cut2 = self._cap(tok.encode(sample.response, add_special_tokens=True), cap)
        budget = max(0, (self.max_length - 4 - len(r1_ids) - len(r2_ids)) // 2)
        p_ids, cut_p = self._cap(p_ids, budget) if budget else ([], len(p_ids))
        p = tok.decode(p_ids, skip_special_tokens=True)
        r1 = tok.decode(r1_ids, skip_special_tokens=True)
        r2 = tok.decode(r2_ids, skip_special_tokens=True)
        text = p + "\n" + r1 + REWARD_SEPARATOR + p + "\n" + r2 + REWARD_TOKEN
        return text, cut1 + cut2 + 2 * cut_p, cut2 > 0

    def encode_batch(
        self, samples: Sequence[Sample], indices: Sequence[int | None] | None = None
    ) -> list[Encoded | SampleError]:
        indices = list(indices) if indices is not None else list(range(len(samples)))
        out: list[Encoded | SampleError] = []
        for sample, idx in zip(samples, indices):
            try:
                text, cut, reply_cut = self.text(sample)
                ids = self.tokenizer.encode(text, add_special_tokens=True)
            except SampleError as exc:
                out.append(SampleError(exc.reason, index=idx, field=exc.field))
                continue
            except Exception as exc:  # a text the tokenizer refuses is this sample's error only
                out.append(SampleError(f"tokenizer failed: {exc}", index=idx, field="messages"))
                continue
            if len(ids) > self.max_tokens:
                out.append(
                    SampleError(
                        f"encoded to {len(ids)} tokens, past max_length={self.max_length} by more than "
                        f"the {self.OVERSHOOT} tokens POLAR's truncation can leave over",
                        index=idx,
                        field="messages",
                    )
                )
                continue
            if not ids or ids[-1] != self.final_token_id:
                out.append(
                    SampleError(f"encoding does not end with {REWARD_TOKEN}", index=idx, field="response")
                )
                continue
            out.append(Encoded(ids, num_truncated_tokens=cut, response_truncated=reply_cut))
        return out


def to_internlm2_state_dict(model: PolarRewardModel, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """PolarRewardModel weights back to InternLM2ForRewardModel names (the inverse of
    :func:`convert_internlm2_state_dict`; fuses q/k/v into ``wqkv`` per KV group)."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg["hidden_size"] // heads
    groups = heads // kv
    inverse = {v: k for k, v in _RENAME.items()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "model.tok_embeddings.weight": state.pop("model.embed_tokens.weight"),
        "model.norm.weight": state.pop("model.norm.weight"),
        "v_head.weight": state.pop("v_head.weight"),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q = state.pop(p + f"self_attn.q_proj.{kind}", None)
            if q is None:
                continue
            k, v = state.pop(p + f"self_attn.k_proj.{kind}"), state.pop(p + f"self_attn.v_proj.{kind}")
            rest = q.shape[1:]
            fused = torch.cat(
                [q.reshape(kv, groups, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], 1
            )
            out[p + f"attention.wqkv.{kind}"] = fused.reshape((heads + 2 * kv) * d, *rest)
    for name, t in state.items():
        m = _LAYER.match(name)
        if m:
            layer, tail = m.groups()
            module, kind = tail.rsplit(".", 1)
            out[f"model.layers.{layer}.{inverse[module]}.{kind}"] = t
    return out


def _capital(reply: str) -> Conversation:
    return [
        {"role": "user", "content": "What is the capital of China?"},
        {"role": "assistant", "content": reply},
    ]


class PolarFamily(RewardFamily):
    name = "polar"
    architectures = ARCHITECTURES
    #: POLAR-7B (model card, via transformers): "about -0.57" and "about -11.03".
    known_answers: ClassVar[dict[str, list[KnownAnswer]]] = {
        "POLAR-7B": [
            KnownAnswer(
                "capital of China, right answer",
                _capital("Beijing."),
                -0.57,
                reference="Beijing.",
                tolerance=0.3,
            ),
            KnownAnswer(
                "capital of China, wrong answer",
                _capital("Shanghai."),
                -11.03,
                reference="Beijing.",
                tolerance=0.5,
            ),
        ]
    }
    sanity_pair = (
        {"messages": _capital("Beijing."), "reference": "Beijing."},
        {"messages": _capital("Shanghai."), "reference": "Beijing."},
    )

    def load(self, request: LoadRequest) -> nn.Module:
        return load_polar(request)

    def model_config(self, config_dict: dict[str, Any]) -> LlamaConfig:
        return llama_config_from_internlm2(config_dict)

    def check_weights(
        self, shapes: Mapping[str, tuple[int, ...] | None], config_dict: dict[str, Any], where: str
    ) -> None:
        check_weight_names(dict(shapes), expected_internlm2_weights(config_dict), where)

    def vllm_config(self, config_dict: dict[str, Any]) -> dict[str, Any] | None:
        """vLLM has ``InternLM2ForRewardModel`` natively; only InternLM2's config CLASS is remote
        code, and its fields are plain Llama ones (plus ``bias``), so vLLM reads them through
        transformers' own LlamaConfig instead of running the checkpoint's Python."""
        out = {k: v for k, v in config_dict.items() if k != "auto_map"}
        out["model_type"] = "llama"
        out["architectures"] = list(ARCHITECTURES)
        return out

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        return model.model, model.v_head  # type: ignore[return-value]

    def encoder(self, tokenizer: Any, hf_config: Any, config: ModelConfig) -> Encoder:
        return PolarEncoder(
            tokenizer,
            max_length=int(config.max_length or 16384),  # POLAR's reference client budget
            reward_token_id=getattr(hf_config, "reward_token_id", None),
        )


FAMILY = PolarFamily()
