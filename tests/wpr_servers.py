"""Test helpers: real reward servers (from :mod:`worldpm_reward.testing.servers`), and pinned
framework client code installed (--no-deps) into a cached directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worldpm_reward.testing.servers import free_port, server_process, server_thread

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worldpm-reward" / "test-deps"

__all__ = ["CACHE", "free_port", "pip_target", "server_process", "server_thread"]


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
