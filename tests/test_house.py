"""The shape of the house (docs/architecture.md): a small public surface, no import cycle,
the top level holds only the core, modules stay readable, ServerState stays small."""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import pytest

import fedtransfer as ft
from fedtransfer.state import ServerState

SRC = Path(ft.__file__).resolve().parent
TOP_LEVEL = {"__init__", "types", "tree", "errors", "seeding", "recipe", "algorithms", "cli"}

# what the redesign (issue 15) has still to take apart: each entry may only shrink or go
PENDING_CYCLES: list[set[str]] = []
PENDING_LONG: dict[str, int] = {}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The fedtransfer modules ``path`` imports, at any depth of the file (function-level
    imports count), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in graph[m]:
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            part = set()
            while True:
                d = stack.pop()
                part.add(d)
                if d == m:
                    break
            if len(part) > 1:
                out.append(part)

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_house_has_no_import_cycle_among_modules() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of ideas
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles = [c for c in _cycles(graph) if c not in PENDING_CYCLES]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_house_the_server_imports_nothing_of_the_client() -> None:
    """The objective's server half is a pipeline step seen through a server-side protocol."""
    graph = _graph()
    crossing = {
        m: sorted(d for d in deps if d.startswith("fedtransfer.client"))
        for m, deps in graph.items()
        if m.startswith("fedtransfer.server")
    }
    assert not {m: d for m, d in crossing.items() if d}, crossing


def test_house_top_level_holds_only_the_core() -> None:
    loose = {p.stem for p in SRC.glob("*.py")}
    assert loose == TOP_LEVEL, f"top-level modules beyond the core: {sorted(loose - TOP_LEVEL)}"


def test_house_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    grown = {m: n for m, n in long.items() if n > PENDING_LONG.get(m, 400)}
    assert not grown, f"modules over 400 lines (or longer than when listed as pending): {grown}"


def test_house_schedules_are_schedules_of_recipes() -> None:
    """A stage is a recipe: no policy wraps a schedule, and no code asks whether a policy is
    staged (the spine asks the ``Schedule``)."""
    import re

    asks = re.compile(r"isinstance\([^)]*,\s*\(?[^)]*\bStages\b")
    found = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "StagePolicy" in (text := p.read_text()) or asks.search(text)
    ]
    assert not found, f"StagePolicy or isinstance(..., Stages) in {found}"
    from fedtransfer.rounds.schedule import Schedule

    assert ft.Schedule is Schedule and not hasattr(ft.transfer, "Stages")


def test_house_server_state_has_at_most_8_fields() -> None:
    names = [f.name for f in dataclasses.fields(ServerState)]
    assert len(names) <= 8, names


def test_public_surface_is_small_and_every_name_resolves() -> None:
    assert len(ft.__all__) <= 40
    assert len(set(ft.__all__)) == len(ft.__all__)
    for name in ft.__all__:
        assert getattr(ft, name) is not None, name
    lowered = [n.lower() for n in ft.__all__]
    twins = {n for n in ft.__all__ if lowered.count(n.lower()) > 1}
    assert not twins, f"case-only twins: {sorted(twins)}"


def test_public_surface_old_names_resolve_with_a_deprecation_warning() -> None:
    from fedtransfer.codecs import TopK
    from fedtransfer.robustness import SignFlip
    from fedtransfer.server import Median

    for name, where in (("TopK", TopK), ("Median", Median), ("SignFlip", SignFlip)):
        with pytest.warns(DeprecationWarning, match=f"fedtransfer.{name} moved"):
            assert getattr(ft, name) is where
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ft.codecs.TopK is TopK and ft.server.Median is Median
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        ft.NoSuchThing  # noqa: B018
