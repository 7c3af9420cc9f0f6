"""The core imports no training or serving framework and has no import side effects."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = [
    "trl",
    "openrlhf",
    "ray",
    "vllm",
    "sglang",
    "fastapi",
    "uvicorn",
    "deepspeed",
    "httpx",
    "pydantic",
    "prometheus_client",
]


def test_core_imports_no_framework() -> None:
    code = (
        "import json, logging, sys\n"
        "import worldpm_reward, worldpm_reward.cli, worldpm_reward.testing, worldpm_reward.knowledge\n"
        "import worldpm_reward.serving, worldpm_reward.client, worldpm_reward.service, worldpm_reward.batcher\n"
        "import worldpm_reward.rewards, worldpm_reward.shaping, worldpm_reward.chat_formats\n"
        f"print(json.dumps({{'loaded': [m for m in {FRAMEWORKS!r} if m in sys.modules],"
        " 'handlers': len(logging.getLogger().handlers), 'cuda': 'torch.cuda' in sys.modules and "
        "__import__('torch').cuda.is_initialized()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"loaded": [], "handlers": 0, "cuda": False}
