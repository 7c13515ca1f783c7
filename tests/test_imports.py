"""The package's modules form layers: no module imports, directly or through others, a
module that imports it back (function-level imports included)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cospec"


def imports_of(path: Path) -> set[str]:
    """The cospec modules ``path`` imports anywhere in its body: ``from cospec.x import``,
    ``from cospec import x``, ``import cospec.x``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "cospec":
                names.update(a.name for a in node.names)
            elif node.module.startswith("cospec."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("cospec."))
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (itself and non-modules left out)."""
    modules = {p.stem for p in package.glob("*.py")}
    return {m: (imports_of(package / f"{m}.py") & modules) - {m} for m in sorted(modules)}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, each module importing the next (the first repeated at
    the end), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:  # graphlib lists each module after its importer
        return list(reversed(err.args[1]))
    return None


def test_graph_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    from cospec.b import g\n")
    (tmp_path / "b.py").write_text("import cospec.c\n")
    (tmp_path / "c.py").write_text("from cospec import a, errors\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    found = cycle(graph)
    assert len(found) == 4 and found[0] == found[-1]
    assert all(y in graph[x] for x, y in zip(found, found[1:]))
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    graph = import_graph()
    assert {"decoding", "acceptance", "cli"} <= set(graph)
    found = cycle(graph)
    assert found is None, "import circle: " + " -> ".join(found)
