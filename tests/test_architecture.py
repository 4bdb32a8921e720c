"""The shape of the code, checked on the source (docs/architecture.md draws it): no import circle,
no import from a lower layer up to a higher one, and functions that fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "trainer", "service")

# Lowest first: a module may import its own layer or the ones before it, never a later one.
LAYERS = (
    ("adapters", "trainer"),  # the versioned registry and gates; the trainer (never service)
    ("service.core",),  # settings, database, errors, migrations
    ("service.storage",),  # the tables and the queries that write and read them
    ("service.engines",),  # the model engines and the adapter routing in front of them
    ("service",),  # the domain (chat, feedback, review, privacy...) and service.loop
    ("service.api",),  # the only layer that knows HTTP schemas
    ("service.main", "service.cli", "service.__main__"),  # entry points
)
LONG_FUNCTION_EXCEPTIONS = {"trainer/dpo.py:train"}  # the training loop reads top to bottom
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "migrations" in rel.parts and "versions" in rel.parts:
                continue
            parts = rel.with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its file, lazily imported ones included:
    ``from a.b import c`` counts as ``a.b.c`` when that is a module, else as ``a.b``."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    """The layer whose longest prefix names the module."""
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def test_the_graph_is_read() -> None:
    # Guards the checks below against passing on an empty graph.
    assert {"service.main", "trainer.dpo", "adapters.registry"} <= set(GRAPH)
    assert "adapters.registry" in GRAPH["service.engines.routing"]


def test_no_import_circle() -> None:
    assert _cycles(GRAPH) == []


def test_no_import_runs_up_a_layer() -> None:
    upward = sorted(
        f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a)
    )
    assert upward == []


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions() -> list[str]:
    found = []
    for path in sorted(MODULES.values()):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                key = f"{rel}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTION_EXCEPTIONS:
                    found.append(f"{key} ({lines} lines)")
    return found


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_functions_fit_on_a_screen(limit: int) -> None:
    assert _long_functions() == [], f"split functions over {limit} lines into named steps"
