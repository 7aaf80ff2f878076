"""The import graph of Sluice's own modules, read with `ast` (nothing is imported):

- no cycle between Sluice modules, through imports at the top of a file or inside functions;
- layers: `shared` imports only `shared`; `tinymodels` (the built-in model builders) imports
  `shared`; `stages` (the workers) and `launch` (the CPU side) import those two and never each
  other (the coordinator starts workers by module name and never loads torch or vLLM); only
  `bench`, `tools` and `tests` sit above, and nothing below `tests` imports `tests`;
- imports sit at the top of each library file; one inside a function is deliberately lazy
  (torch, vLLM, transformers, wandb in a process that must not load them) and says so in a
  comment, `# lazy: <why>`, on its line or the line above it (a run of imports shares one).

    python -m pytest tests/test_import_graph.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, NamedTuple, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "tinymodels", "stages", "launch", "bench", "tools", "tests")
# What each package may import, besides itself.
ALLOWED = {
    "shared": set(),
    "tinymodels": {"shared"},
    "stages": {"shared", "tinymodels"},
    "launch": {"shared", "tinymodels"},
    "bench": {"shared", "tinymodels", "stages", "launch"},
    "tools": {"shared"},
    "tests": set(PACKAGES),
}
LIBRARY = ("shared", "tinymodels", "stages", "launch")


class Import(NamedTuple):
    source: str     # the importing module
    target: str     # a Sluice module it loads
    line: int
    lazy: bool      # inside a function


def modules(root: Path = ROOT) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of Sluice's packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _targets(name: str, source: str, known: Dict[str, Path]) -> List[str]:
    """The Sluice modules that importing `name` from `source` runs: the module and the
    packages above it, except those `source` itself lies in (already loaded before it)."""
    parts = name.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        m = ".".join(parts[:i])
        if m in known and not (source == m or source.startswith(m + ".")):
            out.append(m)
    return out


def imports(known: Dict[str, Path]) -> List[Import]:
    found: List[Import] = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    assert child.level == 0, f"{path}:{child.lineno}: relative import"
                    names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
                else:
                    walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
                    continue
                targets = {t for n in names for t in _targets(n, source, known)}
                found.extend(Import(source, t, child.lineno, lazy) for t in sorted(targets))

        walk(tree, False)
    return found


def cycles(edges: List[Import]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: Dict[str, Set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

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


def unexplained_lazy_imports(path: Path) -> List[int]:
    """Lines of imports inside functions with no `# lazy: <why>` comment on the line or the
    line above (a run of consecutive import lines counts as one, commented once)."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    bad = []

    def explained(i: int) -> bool:  # i: 0-based line of an import
        while True:
            if "# lazy" in lines[i] or (i > 0 and lines[i - 1].strip().startswith("# lazy")):
                return True
            if i == 0 or not lines[i - 1].strip().startswith(("import ", "from ")):
                return False
            i -= 1

    def walk(node, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if lazy and isinstance(child, (ast.Import, ast.ImportFrom)):
                if not explained(child.lineno - 1):
                    bad.append(child.lineno)
            walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return bad


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, imports(known)


def test_the_walker_sees_what_it_must(tmp_path):
    """On a hand-made tree: a cycle closed inside a function, an upward import, lazy imports
    with and without their reason, and a package's own __init__ (never a dependency of its
    modules)."""
    for name, text in {
        "shared/__init__.py": "",
        "shared/a.py": "from shared.b import x\n",
        "shared/b.py": "def f():\n    from shared.a import y\n",
        "launch/__init__.py": "from launch.c import z\n",
        "launch/c.py": "from launch import helpers\nimport shared.a\n",
        "launch/helpers.py": "",
        "stages/__init__.py": "",
        "stages/d.py": "def g():\n    import torch  # lazy: the worker loads it\n    import vllm\n\n"
                       "def h():\n    # the engine's\n    from launch.c import z\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    known = modules(tmp_path)
    edges = imports(known)
    assert cycles(edges) == [["shared.a", "shared.b"]]
    assert ("launch.c", "launch") not in {(e.source, e.target) for e in edges}
    assert [(e.source, e.target, e.lazy) for e in edges if e.source == "stages.d"] == [
        ("stages.d", "launch", True), ("stages.d", "launch.c", True)]
    assert unexplained_lazy_imports(tmp_path / "stages/d.py") == [7]
    assert unexplained_lazy_imports(tmp_path / "shared/b.py") == [2]


def test_no_cycles(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_layers(graph):
    _, edges = graph
    upward = sorted(f"{e.source}:{e.line} imports {e.target}" for e in edges
                    if e.target.split(".")[0] != e.source.split(".")[0]
                    and e.target.split(".")[0] not in ALLOWED[e.source.split(".")[0]])
    assert upward == []


def test_imports_at_the_top(graph):
    known, _ = graph
    unexplained = sorted(f"{known[m].relative_to(ROOT)}:{line}" for m in known
                         if m.split(".")[0] in LIBRARY
                         for line in unexplained_lazy_imports(known[m]))
    assert unexplained == [], "import at the top, or say why not: # lazy: <why>"
