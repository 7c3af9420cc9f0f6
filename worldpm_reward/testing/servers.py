"""Real reward servers for tests and benchmarks: a ``worldpm-reward serve`` subprocess on a free
loopback port, or an ASGI app in a uvicorn thread of this process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worldpm_reward.serving.app import wait_until_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    model: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`worldpm-reward serve` on a free loopback port; stopped with SIGTERM (graceful) at exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "worldpm_reward.cli",
        "serve",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--port",
        str(port),
        *args,
    ]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_until_ready(url, timeout_s=120)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def server_thread(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread of this process (a real HTTP server);
    the server object is ``app.state.uvicorn_server`` (e.g. to start a graceful shutdown)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_options
        )
    )
    app.state.uvicorn_server = server
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:  # e.g. the port was taken meanwhile: say so, not a ConnectError later
        server.should_exit = True
        thread.join(30)
        raise RuntimeError(f"the test server on port {port} did not start (see the log above)")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
