"""A tiny causal-LM policy with its OWN vocabulary and chat template (not WorldPM's), for
trainer tests. The tokenizer is a byte-level BPE trained in-process on real prompts; the
chat template is Phi-3 style (<|user|> ... <|end|>), so every conversation must be
re-rendered in WorldPM's ChatML to be scored correctly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from wpr_testutils import DATA

PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def gsm8k_questions(n: int) -> list[str]:
    with gzip.open(DATA / "prompts" / "gsm8k_train.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
POLICY_FORMATS = {
    "phi3": (PHI3_TEMPLATE, ["<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|end|>", None),
    "chatml": (CHATML_TEMPLATE, ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>", None),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
}


def tiny_policy_tokenizer(vocab_size: int = 600, fmt: str = "phi3"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos, bos = POLICY_FORMATS[fmt]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(gsm8k_questions(500), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos, bos_token=bos)
    tok.chat_template = template
    return tok


def tiny_policy(path: Path | None = None, seed: int = 0, fmt: str = "phi3"):
    """(model, tokenizer): a 2-layer Llama with the tokenizer above; saved to path if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_policy_tokenizer(fmt=fmt)
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
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok
