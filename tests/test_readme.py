"""The README and docs explain the repository as it is: the Layout table names every part of the
package (and nothing that is gone), and every relative link resolves inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "uvmshim"


def _layout_paths() -> list[Path]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths: list[Path] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", cell)
        base = Path(names[0]).parent if not names[0].endswith("/") else Path(names[0])
        first = ROOT / names[0]
        paths.append(first)
        for name in names[1:]:
            paths.append(ROOT / (Path(names[0]).parent / name if not names[0].endswith("/")
                                 else base / name))
    return paths


def test_layout_table_matches_the_tree() -> None:
    listed = _layout_paths()
    missing = [str(p.relative_to(ROOT)) for p in listed if not p.exists()]
    assert missing == [], f"README Layout names paths that do not exist: {missing}"
    covered = {p.resolve() for p in listed}
    unlisted = [
        child.name
        for child in sorted(PKG.iterdir())
        if not child.name.startswith(("_", "."))
        and child.name != "py.typed"
        and child.suffix in (".py", "")
        and child.is_dir() == (child.suffix == "")
        and child.resolve() not in covered
    ]
    assert unlisted == [], f"README Layout does not mention: {unlisted}"


def test_every_relative_link_resolves() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken: list[str] = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []
