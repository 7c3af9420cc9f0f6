"""The package installs and runs INSIDE each framework's own environment.

1. The frameworks' published requirements (wheel METADATA of veRL 0.9.1 incl. its [vllm] set,
   OpenRLHF 0.11.2, TRL 1.16.0) and the project's declared requirements must leave a common
   version of every shared package, so a future bump cannot silently break co-installation.
2. Fresh virtualenvs built by pip's resolver (torch 2.13.0 first, then ``pip install -e
   .[extras]`` TOGETHER with the framework's pins; see tests/wpr_venvs.py), cached under
   ~/.cache/worldpm-reward/test-deps keyed by the requirement set: the parity tests and that
   framework's adapter tests run there, on this tree's code.

Without network access (first run) these skip with the reason; under ``CI`` they fail instead.
``WPR_COINSTALL_FULL=1`` runs all four parity files inside (about 4x longer).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from wpr_venvs import (
    OPENRLHF_ENV,
    ROOT,
    VERL_ENV,
    FrameworkEnv,
    framework_python,
    installed_versions,
    published_requirements,
    run_tests_inside,
)

FRAMEWORKS = {
    # framework spec: (its extras to include, the project's extras used in that environment)
    "verl==0.9.1": (("vllm",), ("client",)),
    "openrlhf==0.11.2": ((), ("client", "serve", "ray")),
    "trl==1.16.0": ((), ("trl",)),
}


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} unavailable (network or package index?): {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must not skip these silently
    pytest.skip(message)


def project_requirements(extras: Iterable[str]) -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11 (tomllib)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _applies(req: Requirement, extras: Sequence[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def _candidates(specs: Iterable[SpecifierSet]) -> list[Version]:
    """Every version the specifiers name, and just above each: if two ranges overlap, one of
    these lies in the overlap (a range's lowest member is a bound or just above one)."""
    out: set[Version] = set()
    for spec in specs:
        for s in spec:
            v = Version(s.version.replace(".*", ""))
            rel = v.release + (0,) * (3 - len(v.release))
            out |= {v, Version(f"{rel[0]}.{rel[1]}.{rel[2] + 1}"), Version(f"{rel[0]}.{rel[1] + 1}.0")}
            out.add(Version(f"{rel[0] + 1}.0.0"))
    return sorted(out) or [Version("0")]


def conflicts(ours: Sequence[Requirement], theirs: Sequence[Requirement], extras: Sequence[str]) -> list[str]:
    """Packages both require for which no version satisfies every specifier (prereleases allowed)."""
    by_name: dict[str, list[SpecifierSet]] = {}
    named: dict[str, list[str]] = {}
    for req in [*ours, *(r for r in theirs if _applies(r, extras))]:
        name = canonicalize_name(req.name)
        by_name.setdefault(name, []).append(req.specifier)
        named.setdefault(name, []).append(str(req))
    ours_names = {canonicalize_name(r.name) for r in ours}
    bad = []
    for name, specs in by_name.items():
        if name not in ours_names or len(specs) < 2:
            continue
        if not any(all(s.contains(v, prereleases=True) for s in specs) for v in _candidates(specs)):
            bad.append(f"{name}: {' / '.join(named[name])}")
    return bad


def test_the_conflict_check_itself_catches_the_old_pins() -> None:
    """The check can fail: yesterday's `transformers>=5.23` against veRL's `<5.11`."""
    theirs = [Requirement("transformers>=5.5.3,<5.11,!=5.6.0"), Requirement("torch==2.11.0; extra == 'vllm'")]
    assert conflicts([Requirement("transformers>=5.23,<6")], theirs, ["vllm"]) == [
        "transformers: transformers<6,>=5.23 / transformers!=5.6.0,<5.11,>=5.5.3"
    ]
    assert conflicts([Requirement("torch>=2.13")], theirs, ["vllm"])  # [vllm] pins torch 2.11
    assert not conflicts([Requirement("torch>=2.13")], theirs, [])  # ... only with the extra
    assert not conflicts([Requirement("transformers>=5.9,<6")], theirs, ["vllm"])
    assert not conflicts([Requirement("ray>=2.55,<3")], [Requirement("ray[default]==2.55.0")], [])


@pytest.mark.framework
@pytest.mark.parametrize("spec", sorted(FRAMEWORKS))
def test_published_framework_requirements_leave_a_common_version(spec: str) -> None:
    their_extras, our_extras = FRAMEWORKS[spec]
    try:
        requires, requires_python = published_requirements(spec)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        _unavailable(f"{spec}'s wheel metadata", exc)
    theirs = [Requirement(r) for r in requires]
    assert theirs, f"{spec} publishes no requirements?"
    bad = conflicts(project_requirements(our_extras), theirs, their_extras)
    assert not bad, f"pyproject.toml leaves no common version with {spec}{list(their_extras)}: {bad}"
    if requires_python:
        assert SpecifierSet(requires_python).contains("3.10") or SpecifierSet(requires_python).contains(
            "3.11"
        )


def _run_inside(env: FrameworkEnv, want: dict[str, str], tests: Sequence[str]) -> None:
    try:
        python = framework_python(env)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        _unavailable(f"the {env.name} environment", exc)
    versions = installed_versions(python, [*want, "worldpm-reward"])
    print(f"{env.name}: pip resolved {versions}")  # for the report (pytest -s)
    for name, version in want.items():
        assert versions[name] == version, (name, versions)
    assert versions["worldpm-reward"] is not None
    done = run_tests_inside(python, tests, timeout=1800)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    summary = re.findall(r"(\d+) passed", tail)
    assert summary and int(summary[-1]) > 0, tail
    print(tail.splitlines()[-1])


def _parity(full_list: Sequence[str]) -> list[str]:
    if os.environ.get("WPR_COINSTALL_FULL"):
        return list(full_list)
    # the parity tests against independent references (their own transformers version's
    # model code); WPR_COINSTALL_FULL=1 adds shared prefixes, loading and POLAR
    return ["tests/test_scoring_reference.py"]


@pytest.mark.slow
@pytest.mark.framework
@pytest.mark.timeout(3600)  # a cold build, then the tests inside (pytest's 900 s default is too short)
def test_inside_verls_environment() -> None:
    """transformers 5.9.0 (veRL 0.9.1's [vllm] pin) + ray + hydra-core resolved with the project;
    veRL 0.9.1 --no-deps: its reward loop, its Hydra entry point's validate_config."""
    parity = _parity(VERL_ENV.tests[:4])
    _run_inside(
        VERL_ENV,
        {"verl": "0.9.1", "transformers": "5.9.0"},
        [*parity, "tests/integrations/test_verl.py", "tests/test_tool_turns.py"],
    )


@pytest.mark.slow
@pytest.mark.framework
@pytest.mark.timeout(3600)
def test_inside_openrlhfs_environment() -> None:
    """OpenRLHF 0.11.2's pins: transformers 5.15.0, ray[serve] 2.55.0 (openrlhf itself --no-deps)."""
    parity = _parity(OPENRLHF_ENV.tests[:4])
    _run_inside(
        OPENRLHF_ENV,
        {"openrlhf": "0.11.2", "transformers": "5.15.0", "ray": "2.55.0"},
        [*parity, "tests/integrations/test_openrlhf.py"],
    )
