"""The tree shows the architecture, and the imports keep to it (docs/architecture.md, "Rooms").

Read from the source with ``ast``, every import counted: module level, inside functions, and
under ``TYPE_CHECKING``. A room is a subpackage (``_wire``, ``_rpc``, ``_envs``, ``_host``,
``_cli``, ``broker``, ``workers``) or a top-level module of ``pyisolate``.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_ROOMS = ("_wire", "_rpc", "_envs", "_host", "_cli")
ROOMS = (*PRIVATE_ROOMS, "broker", "workers")
# What a worker process imports; none of it may reach the host side. (The package's __init__
# names host-side classes too, imported on first use: a worker never touches them.)
WORKER_SIDE = {"pyisolate.errors", "pyisolate._base", "pyisolate._actors", "pyisolate._singleton",
               "pyisolate._wire", "pyisolate._rpc", "pyisolate.broker", "pyisolate.workers"}  # fmt: skip
HOST_SIDE = {"pyisolate._host", "pyisolate._envs", "pyisolate._cli", "pyisolate._config", "pyisolate._manifest",
             "pyisolate._discovery", "pyisolate._validate", "pyisolate._policy", "pyisolate._limits",
             "pyisolate._upstream", "pyisolate._sources", "pyisolate._placement"}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("broker", "workers"):
        parts.insert(0, "pyisolate")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for top in ("pyisolate", "broker", "workers") for p in (ROOT / top).rglob("*.py")}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ROOMS:
        return ".".join(parts[:2])
    return module


def _owning(name: str) -> str:
    """The module ``name`` is, or the one it lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every pyisolate import in ``module``.

    A submodule imported by name (``from . import shm``) is its own target, with no name.
    """
    return [(target, name, line) for target, name, line, _ in _imports(module)]


def _imports(module: str) -> list[tuple[str, str | None, int, tuple[str, str | None]]]:
    """As ``imports``, each with what the statement wrote: ``(from module, name)``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_owning(a.name), None, node.lineno, (a.name, None)) for a in node.names
                      if a.name.split(".")[0] == "pyisolate"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pyisolate":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                written = (target, alias.name)
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno, written))
                else:
                    found.append((_owning(target), alias.name, node.lineno, written))
    return found


def _all_of(module: str) -> set[str]:
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_tree_has_its_rooms() -> None:
    for name in PRIVATE_ROOMS:
        assert (ROOT / "pyisolate" / name / "__init__.py").is_file(), name
        assert _all_of(f"pyisolate.{name}"), f"pyisolate/{name}/__init__.py must say what the rest may use (__all__)"


def test_no_circles_between_modules() -> None:
    edges = {module: {target for target, _, _ in imports(module) if target != module} for module in MODULES}
    assert _cycles(edges) == []


def test_no_circles_between_rooms() -> None:
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for module in MODULES:
        for target, _, _ in imports(module):
            if room(target) != room(module):
                edges[room(module)].add(room(target))
    assert _cycles(edges) == []


def test_rooms_are_entered_through_what_their_init_names() -> None:
    wrong = []
    for module in MODULES:
        for target, name, line, (written, written_name) in _imports(module):
            there = room(target)
            if there == room(module):
                continue
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            if there.rpartition(".")[2] in PRIVATE_ROOMS:
                if written != there or written_name not in _all_of(there):
                    wrong.append(f"{where} imports {written}.{written_name}; use what {there} names")
            elif (name or target.rpartition(".")[2]).startswith("_"):
                wrong.append(f"{where} imports the private {target}{'.' + name if name else ''}")
    assert wrong == []


def test_the_worker_side_never_imports_the_host_side() -> None:
    wrong = []
    for module in MODULES:
        if room(module) in WORKER_SIDE:
            wrong += [f"{module} imports {target}" for target, _, _ in imports(module) if room(target) in HOST_SIDE]
    assert wrong == []


@pytest.mark.parametrize(
    ("module", "above"),
    [
        ("pyisolate._host.worker", {"pyisolate._host", "pyisolate._host.manager"}),  # it needs only ``Host``
        ("pyisolate._rpc.blocking", {"pyisolate._host", "pyisolate._host.extension"}),  # handles name their loop
        ("pyisolate.workers.loader", {"pyisolate"}),  # finds the package's directory, does not import it
    ],
)
def test_the_narrow_interfaces_stay_narrow(module: str, above: set[str]) -> None:
    assert {target for target, _, _ in imports(module)} & above == set()
