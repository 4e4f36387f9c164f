"""The guest agent and the protocol import only the standard library and each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "uvmshim"
ALLOWED_OWN = ("uvmshim.agent", "uvmshim.protocol")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, "uvmshim.<relative>"))  # resolved below
                continue
            out.append((node.lineno, node.module or ""))
    return out


def test_agent_and_protocol_are_stdlib_only() -> None:
    bad = []
    files = sorted([*(SRC / "agent").rglob("*.py"), *(SRC / "protocol").rglob("*.py")])
    assert files
    for path in files:
        for line, name in _imports(path):
            top = name.split(".")[0]
            if name == "uvmshim.<relative>":
                continue  # a relative import stays inside its own package
            if top == "uvmshim":
                if name != "uvmshim" and name.startswith(ALLOWED_OWN):
                    continue
            elif top in sys.stdlib_module_names or top == "__future__":
                continue
            bad.append(f"{path.relative_to(SRC)}:{line}: imports {name}")
    assert not bad, "\n".join(bad)
