"""The dependency rules of the design card, checked on the source:
service → adapters ← trainer; trainer never imports service; adapters never imports torch."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["service", "trainer", "adapters"]
FORBIDDEN = {
    "trainer": {"service"},
    "adapters": {"service", "trainer", "torch", "transformers", "peft"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package: str) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


@pytest.mark.parametrize("module", all_modules())
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


LOOP = {f"service.loop.{p.stem}": p for p in (ROOT / "service" / "loop").glob("*.py")}


def test_the_loop_knows_no_http() -> None:
    """service/loop/ sits below the API: it never imports service.api (functions' own imports
    count too)."""
    reaching_up = {
        name: sorted(m for m in imported_modules(path) if m.startswith("service.api"))
        for name, path in LOOP.items()
    }
    assert not {k: v for k, v in reaching_up.items() if v}


def test_the_loop_has_no_import_circle() -> None:
    """The modules of service/loop/ import one another in one direction only."""
    edges = {name: imported_modules(path) & set(LOOP) - {name} for name, path in LOOP.items()}

    def circle_from(start: str, at: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges[at]):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = circle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    circles = [c for name in sorted(LOOP) if (c := circle_from(name, name, (name,)))]
    assert not circles, circles
