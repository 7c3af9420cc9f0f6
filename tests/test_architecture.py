"""The layout's rules, checked: the core imports no framework and has no import side effects,
the package's modules form no import cycle, and benchmarks use only the public package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worldpm_reward"

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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.slow
def test_core_imports_no_framework() -> None:
    """Every module outside integrations/ (the adapters) imports cleanly with no framework,
    no logging handler and no CUDA initialisation."""
    core = [m for m in _modules() if ".integrations" not in m]
    assert len(core) >= 25, core  # the walk found the package
    code = (
        "import importlib, json, logging, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        f"print(json.dumps({{'loaded': [m for m in {FRAMEWORKS!r} if m in sys.modules],"
        " 'handlers': len(logging.getLogger().handlers), 'cuda': 'torch.cuda' in sys.modules and "
        "__import__('torch').cuda.is_initialized()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"loaded": [], "handlers": 0, "cuda": False}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Package modules that ``path`` imports anywhere (function-level imports included;
    ``if TYPE_CHECKING:`` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}
    # a module's own package __init__ is imported first by Python: not a dependency edge of ours
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_benchmarks_import_only_the_public_package() -> None:
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith(("tests", "wpr_")), f"{path.name} imports {name}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("worldpm_reward"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
        assert "sys.path" not in path.read_text(encoding="utf-8"), f"{path.name} edits sys.path"


def test_package_and_cli_help_import_neither_torch_nor_transformers() -> None:
    """`import worldpm_reward`, the CLI module and every `--help` stay light: torch and
    transformers are imported when a model is loaded, not before (engines are found by name)."""
    code = (
        "import sys, contextlib, io\n"
        "import worldpm_reward, worldpm_reward.cli as cli\n"
        "for argv in (['--help'], ['score', '--help'], ['serve', '--help'], ['selftest', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_engine_names_have_one_source_and_each_registered_engine_loads() -> None:
    """The engine names a config accepts are exactly the registry's, and every registry entry
    imports to a class with the engine seam's ``load`` and every member of its protocol, with
    the protocol's parameter names."""
    import inspect
    import typing

    from worldpm_reward.config import EngineName
    from worldpm_reward.engines import ENGINES, engine_class
    from worldpm_reward.engines.base import Engine

    assert set(typing.get_args(EngineName)) == set(ENGINES)
    members = {n for n in vars(Engine) if not n.startswith("_") and n not in vars(typing.Protocol)} | set(
        Engine.__annotations__
    )
    assert {"score_encoded", "forward_ids", "device", "close", "model"} <= members  # the walk saw them
    for name in ENGINES:
        cls = engine_class(name)
        assert callable(getattr(cls, "load", None)), name
        assert list(inspect.signature(cls.load).parameters) == ["name_or_path", "config"], name
        for member in members - set(Engine.__annotations__):
            assert hasattr(cls, member), f"engine {name!r} lacks {member}"
            want, got = getattr(Engine, member), getattr(cls, member)
            if inspect.isfunction(want):
                assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), (
                    f"engine {name!r}: {member} does not take the protocol's parameters"
                )
            else:
                assert isinstance(got, property), f"engine {name!r}: {member} is not a property"


def test_engines_are_peers_not_subclasses_of_the_front() -> None:
    """RewardModel holds an engine; no engine class is (or derives from) the front."""
    import importlib
    import inspect

    from worldpm_reward.engines import ENGINES
    from worldpm_reward.scoring import RewardModel

    modules = [m for m in _modules() if m.startswith("worldpm_reward.engines.")]
    assert {t.partition(":")[0] for t in ENGINES.values()} <= set(modules)
    for module in modules:
        for _, cls in inspect.getmembers(importlib.import_module(module), inspect.isclass):
            assert not issubclass(cls, RewardModel), f"{module}.{cls.__name__} subclasses RewardModel"
    assert not hasattr(RewardModel, "__getattr__")  # nothing forwarded by magic either


def test_family_names_have_one_source() -> None:
    """The family names a config accepts are "auto" plus exactly the registry's, and an
    unknown family is a ConfigError (a WorldPMRewardError and a ValueError)."""
    import typing

    import pytest

    from worldpm_reward.config import FamilyName
    from worldpm_reward.errors import ConfigError
    from worldpm_reward.families import FAMILIES, get_family

    assert set(typing.get_args(FamilyName)) == {"auto", *FAMILIES}
    for name, family in FAMILIES.items():
        assert family.name == name and get_family(name) is family
    with pytest.raises(ConfigError, match="family"):
        get_family("llama")


def test_user_mistakes_raise_worldpm_reward_errors() -> None:
    """A wrong option, dtype, batching setting or missing extra is a WorldPMRewardError, and
    still the built-in class callers caught before (TypeError, ValueError, ImportError)."""
    import pytest

    from worldpm_reward.batching import plan_batches
    from worldpm_reward.checkpoints import resolve_dtype
    from worldpm_reward.config import ModelConfig
    from worldpm_reward.errors import (
        ConfigError,
        ConfigTypeError,
        MissingExtraError,
        WorldPMRewardError,
        require_extra,
    )

    with pytest.raises(ConfigTypeError, match="max_batch_tokenz") as unknown:
        ModelConfig.from_kwargs(max_batch_tokenz=1)
    assert isinstance(unknown.value, TypeError) and isinstance(unknown.value, WorldPMRewardError)
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("fp7", "cpu")
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        plan_batches([3, 2], 0, None, 0.0)
    with pytest.raises(MissingExtraError, match=r"worldpm-reward\[nope\]") as missing:
        require_extra("worldpm_reward_no_such_module", "nope")
    assert isinstance(missing.value, ImportError)
