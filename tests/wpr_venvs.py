"""Test helpers: the frameworks' own environments, built by pip's resolver and cached.

A framework environment is a fresh virtualenv where ``torch==2.13.0`` is installed first
(never a CUDA build), then ``pip install -e ROOT[extras]`` TOGETHER with the framework's
pins in one resolver run: what a user of that framework does. Packages that cannot be
installed on a CPU machine with their dependencies (OpenRLHF needs flash-attn and
deepspeed builds) are added afterwards with ``--no-deps``, after the project's own
requirements were resolved against the framework's pins.

The cache key is the requirement set plus the project's declared dependencies
(pyproject.toml), so a changed range rebuilds the environment. Tests run inside with
``PYTHONPATH=ROOT``, so the cached editable install never matters: the code under test is
this tree's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from wpr_servers import CACHE

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class FrameworkEnv:
    """One framework's environment: what pip resolves together, what goes in --no-deps."""

    name: str
    #: resolved in ONE pip run together with ``-e ROOT[extras]``
    requirements: tuple[str, ...]
    extras: tuple[str, ...]
    #: installed afterwards with --no-deps (their heavy GPU-only dependencies stay out)
    no_deps: tuple[str, ...] = ()
    #: test files (tests/...) run inside, and pytest -k/-m filters
    tests: tuple[str, ...] = field(default_factory=tuple)


#: veRL 0.9.1's transformers (its [vllm] set pins 5.9.0) resolved with the project and the
#: 'test' extra (hydra-core, omegaconf<2.4, tensordict<=0.10: what veRL's entry point and
#: reward loop import); veRL itself --no-deps, as its GPU dependencies (vllm, flash-attn) and
#: its full set would make a cold build far longer. Resolving ``verl==0.9.1`` WITH its
#: dependencies next to ``-e .`` also works (checked by hand; the published-requirements test
#: guards it).
VERL_ENV = FrameworkEnv(
    name="verl-0.9.1",
    requirements=("transformers==5.9.0", "ray>=2.55,<3"),  # veRL: ray[default]>=2.41
    extras=("testing", "test", "client", "serve"),  # serve: veRL's tests also start a reward server
    no_deps=("verl==0.9.1",),
    tests=(
        "tests/test_scoring_reference.py",
        "tests/families/test_polar.py",
        "tests/engines/test_shared_prefix.py",
        "tests/test_checkpoints.py",
        "tests/integrations/test_verl.py",
    ),
)

#: OpenRLHF 0.11.2's pins (transformers 5.15.0, ray 2.55.0) resolved with the project;
#: openrlhf itself --no-deps (its deepspeed/flash-attn need CUDA builds).
OPENRLHF_ENV = FrameworkEnv(
    name="openrlhf-0.11.2",
    requirements=("transformers==5.15.0", "ray[serve]==2.55.0"),
    extras=("testing", "test", "client", "serve", "ray"),
    no_deps=("openrlhf==0.11.2",),
    tests=(
        "tests/test_scoring_reference.py",
        "tests/families/test_polar.py",
        "tests/engines/test_shared_prefix.py",
        "tests/test_checkpoints.py",
        "tests/serving/test_app.py",
        "tests/integrations/test_openrlhf.py",
    ),
)


def _declared_dependencies() -> str:
    """The project's dependency declarations (pyproject.toml's [project] tables)."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("dependencies = [")
    end = text.index("[project.scripts]")
    return text[start:end]


def env_dir(env: FrameworkEnv) -> Path:
    key = json.dumps([TORCH, env.requirements, env.extras, env.no_deps, _declared_dependencies()])
    return CACHE / f"venv-{env.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _pip(python: Path, *args: str, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ pip {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            [str(python), "-m", "pip", "--disable-pip-version-check", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1500,
        )
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"pip {' '.join(args)} failed (log {log}):\n{tail}")


def framework_python(env: FrameworkEnv) -> Path:
    """The environment's python, building it on first use (a few minutes, then cached)."""
    target = env_dir(env)
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        return python
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    log = target / "install.log"
    _pip(python, "install", "-q", TORCH, log=log)  # first: never a CUDA build
    extras = ",".join(env.extras)
    _pip(python, "install", "-q", "-e", f"{ROOT}[{extras}]", *env.requirements, log=log)
    if env.no_deps:
        _pip(python, "install", "-q", "--no-deps", *env.no_deps, log=log)
    (target / ".complete").touch()
    return python


def installed_versions(python: Path, names: Sequence[str]) -> dict[str, str | None]:
    """Distribution versions inside an environment (None when absent)."""
    code = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
        "for n in sys.argv[1:]:\n    try: out[n] = version(n)\n"
        "    except PackageNotFoundError: out[n] = None\nprint(json.dumps(out))"
    )
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def run_tests_inside(
    python: Path, files: Sequence[str], *, timeout: float = 900
) -> subprocess.CompletedProcess:
    """pytest inside the environment on this tree's code (PYTHONPATH=ROOT)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def published_requirements(spec: str) -> tuple[list[str], str | None]:
    """``Requires-Dist`` and ``Requires-Python`` of a wheel as published (``pip download
    --no-deps``, cached), read from its METADATA."""
    target = CACHE / "metadata" / spec.replace("==", "-")
    meta = target / "METADATA"
    if not meta.exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(target),
                spec,
            ],
            check=True,
            timeout=600,
        )
        (wheel,) = target.glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta.write_bytes(zf.read(name))
        wheel.unlink()
    msg = Parser().parsestr(meta.read_text())
    return list(msg.get_all("Requires-Dist") or []), msg.get("Requires-Python")
