"""The package's layers (docs/design.md §1), read from the code's own imports.

Each module of `proxy/` stands on a floor and imports only from floors below it; the scheduler is
pure; only each host drives its own; the routes read views, never the scheduler; the reconciler
returns values and touches neither the scheduler nor the event bus; `serve` loads neither the
emulator nor the bench.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# The floors, from the leaves up. A module imports only modules on lower floors.
FLOORS: list[set[str]] = [
    {
        "units",
        "errors",
        "events",
        "metrics",
        "scheduling",
        "placement",
        "loadtimes",
        "capacity",
        "transport",
        "config_errors",
        "usage",
        "keys",
    },
    {"config", "scheduler"},
    {"lmstudio"},
    {"reconciler"},
    {"views", "names", "leases", "reporter"},
    {"host"},
    {"manager"},
    {"access", "bodies", "state", "ollama"},
    {"auth", "streaming", "server", "ollama_answers"},
    {"feedback"},
    {"openai_routes", "admin_routes"},
    {"ollama_routes"},
    {"app"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
FLOOR = {module: level for level, modules in enumerate(FLOORS) for module in modules}
# Stand-alone subpackages: they may use these modules of the proxy, and nothing else of it.
STANDALONE = {
    "emulator": set[str](),
    "bench": {"server"},
    "simulate": {"scheduler", "scheduling", "loadtimes", "placement", "config", "units"},
}


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The `proxy` modules `path` imports (as names under `proxy.`), at its top level or all."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "proxy":
                found.update(alias.name for alias in node.names if alias.name != "__version__")
            elif node.module.startswith("proxy."):
                found.add(node.module.removeprefix("proxy."))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("proxy.") for a in node.names if a.name.startswith("proxy.")
            )
    return found


def _top(name: str) -> str:
    return name.split(".", 1)[0]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_floor_or_a_subpackage() -> None:
    for path in MODULES:
        name = _module_name(path)
        assert name in FLOOR or _top(name) in STANDALONE, f"{name}: on no floor of docs/design.md"


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_imports_run_down_the_floors(path: Path) -> None:
    name = _module_name(path)
    used = imports(path)
    if _top(name) in STANDALONE:
        own = _top(name)
        outside = {m for m in used if _top(m) != own} - STANDALONE[own]
        assert not outside, f"{name} imports {sorted(outside)} of the proxy"
        return
    for module in used:
        if _top(module) in STANDALONE:
            # Only the commands that need them, inside the function that does (see below).
            assert name in {"cli", "demo"}, f"{name} imports {module}"
            assert module not in imports(path, top_level_only=True), f"{name}: {module} at top"
            continue
        assert FLOOR[module] < FLOOR[name], f"{name} (floor {FLOOR[name]}) imports {module}"


def test_routes_read_views_not_the_scheduler() -> None:
    for route in ("openai_routes", "admin_routes"):
        used = imports(PACKAGE / f"{route}.py")
        assert not used & {"scheduling", "scheduler", "reconciler"}, route


def test_the_reconciler_touches_neither_scheduler_nor_events() -> None:
    used = imports(PACKAGE / "reconciler.py")
    assert not used & {"scheduling", "scheduler", "events", "metrics", "manager"}


def test_only_the_hosts_and_their_pure_helpers_see_the_scheduler() -> None:
    """Each host alone drives its scheduler; views and names only read what it passes them;
    the pool places requests on hosts and never touches a scheduler. (`lmswitch simulate`'s
    replay drives a scheduler of its own, in virtual time, as a host does.)"""
    users = {_module_name(p) for p in MODULES if "scheduler" in imports(p)}
    assert users == {"host", "views", "simulate.replay"}


def test_the_scheduler_is_pure() -> None:
    """No I/O, no async, no clock, no randomness: only its own vocabulary and the stdlib's data."""
    allowed = {"__future__", "collections", "collections.abc", "dataclasses", "enum", "proxy"}
    allowed |= {"statistics"}  # medians, for the expected load times
    allowed |= {"typing"}  # `Any`, for the learned capacity's status row
    for module in ("scheduling", "scheduler", "placement", "loadtimes", "capacity"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.AsyncFunctionDef | ast.Await), module
            if isinstance(node, ast.ImportFrom):
                module_name = str(node.module)
                assert node.module in allowed or module_name.startswith(
                    ("proxy.sched", "proxy.pla", "proxy.loadtimes", "proxy.capacity")
                ), (module, module_name)
            elif isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= allowed, module


def test_the_layer_checks_see_a_wrong_import(tmp_path: Path) -> None:
    """The checks above read imports anywhere in a module, lazy ones included."""
    module = tmp_path / "x.py"
    module.write_text(
        "from proxy import scheduling as sch, __version__\n"
        "import proxy.manager\n"
        "def f():\n    from proxy.emulator import Emulator\n",
        encoding="utf-8",
    )
    assert imports(module) == {"scheduling", "manager", "emulator"}
    assert imports(module, top_level_only=True) == {"scheduling", "manager"}


def test_serve_loads_neither_the_emulator_nor_the_bench(tmp_path: Path) -> None:
    """`lmswitch serve` builds its server without importing the tools beside it."""
    code = (
        "import json, sys\n"
        "from proxy.cli import build_server\n"
        "build_server(['--config', sys.argv[1]])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('proxy.'))))\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text("upstream:\n  base_url: http://127.0.0.1:9\n", encoding="utf-8")
    done = subprocess.run(  # noqa: S603 - our own interpreter, our own code
        [sys.executable, "-c", code, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "proxy.app" in loaded  # it did build the proxy
    assert not [m for m in loaded if _top(m.removeprefix("proxy.")) in STANDALONE]
