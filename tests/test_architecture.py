"""The shape of the code: imports within ``gateway/`` go one way.

Every import counts: at the top of a module, inside a function, and under ``if
TYPE_CHECKING:`` (a circle a type checker follows is still a circle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules among ``known`` that the module ``name`` (its text ``source``) imports
    anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from . import settings``, ``from .fleet import client``: names that are
            # modules are the edges; the package itself only if a name is its own
            submodules = {f"{origin}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(origin)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    every = modules()
    return {name: imported(name, path.read_text(), set(every), path.name == "__init__.py")
            for name, path in every.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_everywhere_in_a_module():
    graph = import_graph()
    assert "gateway.backends.upstream" in graph["gateway.web.state"]  # at the top
    assert "gateway.fleet.client" in graph["gateway.backends.upstream"]  # from ..fleet import client
    assert "gateway.settings" in graph["gateway.backends.upstream"]  # from .. import settings
    hidden = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from ..web.state import Gateway\n"
              "def later():\n    from .. import config\n    import gateway.web.stats\n")
    assert imported("gateway.fleet.probe", hidden, set(graph)) == {"gateway.web.state", "gateway.config", "gateway.web.stats"}
    assert imported("gateway.probe", "from . import hookimpl\n", set(graph)) == {"gateway"}


def test_no_import_circle_in_gateway():
    found = circles(import_graph())
    assert not found, "import circles in gateway/: " + "; ".join(" ⇄ ".join(c) for c in found)


def test_the_redis_link_and_admission_know_nothing_of_the_gateway_above_them():
    graph = import_graph()
    above = {"gateway.web.state", "gateway.backends.upstream", "gateway.web.reload", "gateway.web.exchange", "gateway.web.app"}
    assert not graph["gateway.storage.shared"] & (above | {"gateway.backends.admission"})
    assert not graph["gateway.backends.admission"] & above
