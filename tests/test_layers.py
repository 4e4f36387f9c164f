"""The package's import graph: lower layers never import higher ones, and no module cycle.

Read from the source with :mod:`ast` (every import, including those under ``TYPE_CHECKING``
and inside functions), so that the layer picture in docs/design.md stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import uvmshim

SRC = Path(uvmshim.__file__).parent

#: Layer of each top-level part of the package, lowest first. A module may import modules of
#: its own layer or lower ones. ``protocol`` and ``agent`` are shared with (or run in) the guest.
LAYERS: dict[str, int] = {
    "protocol": 0,
    "agent": 0,
    "errors": 1,
    "guestpath": 2,
    "hostpath": 2,
    "procscan": 2,
    "owners": 2,
    "asyncutil": 2,
    "tools": 2,
    "spec": 2,
    "resources": 2,
    "uvm": 3,
    "image": 3,
    "allocator": 4,
    "layers": 4,
    "devices": 4,
    "plan": 4,
    "runtime": 5,
    "runc": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("uvmshim"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("uvmshim"):
                continue
            for alias in node.names:
                # ``from pkg import mod`` imports a module when pkg/mod exists.
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        graph[module] = {m for m in _imports(path, module) if m != module}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: add {top!r} to LAYERS in tests/test_layers.py"
    return LAYERS[top]


def test_no_import_from_a_higher_layer() -> None:
    wrong = [
        f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
        for mod, deps in _graph().items()
        for dep in sorted(deps)
        if dep != "uvmshim" and _layer(dep) > _layer(mod)
    ]
    assert wrong == []


def test_no_import_cycle() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    edges = {m: {d for d in deps if d in graph and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_guest_agent_imports_only_guest_code() -> None:
    def guest_side(module: str) -> bool:
        return module.split(".")[1:2] in (["agent"], ["protocol"])

    for mod, deps in _graph().items():
        if guest_side(mod):
            outside = [d for d in deps if not guest_side(d)]
            assert outside == [], f"{mod} imports {outside}"
