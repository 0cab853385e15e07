"""The package layers, read from the source with `ast` (nothing is imported).

Lowest first: workers (the trainer side; imports no other bplab package), analysis.rundir (the
run directory's format), the rest of analysis, jobs. A module may import its own layer and the
ones below it, never one above; the imports (also those inside functions) form no circle.
tests/ and benchmarks/ may import anything. A module over 600 lines says why on its first line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "analysis", "jobs")
LONG = 600


def layer(module: str) -> int:
    if module.split(".")[0] == "workers":
        return 0
    if module == "analysis.rundir" or module.startswith("analysis.rundir."):
        return 1
    if module.split(".")[0] == "analysis":
        return 2
    return 3


LAYERS = ["workers", "analysis.rundir", "analysis (the rest)", "jobs"]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The bplab modules `path` imports: `from pkg import sub` counts as importing pkg.sub when
    sub is a module, else as importing pkg (its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= subs
            if len(subs) < len(node.names):
                found.add(node.module)
    return found & known


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
            for a in sorted(edges) for b in sorted(edges[a]) if layer(b) > layer(a)]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.timeout(60)
def test_no_module_imports_a_layer_above_its_own():
    edges = graph()
    assert len(edges) > 40 and "analysis.rundir.run" in edges  # the scan found the tree
    assert upward(edges) == []


@pytest.mark.timeout(60)
def test_the_imports_form_no_circle():
    assert circles(graph()) == []


@pytest.mark.timeout(60)
def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks on a small tree of their own: an upward import and a circle are found."""
    for name, text in {
        "workers/__init__.py": "", "workers/a.py": "from analysis.rundir import layout\n",
        "analysis/__init__.py": "", "analysis/rundir/__init__.py": "",
        "analysis/rundir/layout.py": "def f():\n    import jobs.cli\n",
        "jobs/__init__.py": "", "jobs/cli.py": "from jobs import study\n", "jobs/study.py": "import jobs.cli\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = graph(tmp_path)
    assert upward(edges) == [
        "analysis.rundir.layout (analysis.rundir) imports jobs.cli (jobs)",
        "workers.a (workers) imports analysis.rundir.layout (analysis.rundir)",
    ]
    assert circles(edges) == [["jobs.cli", "jobs.study"]]


@pytest.mark.timeout(60)
def test_a_long_module_says_why_on_its_first_line():
    long = {name: path for name, path in modules().items() if len(path.read_text().splitlines()) > LONG}
    unexplained = [name for name, path in long.items()
                   if not (path.read_text().splitlines()[0].startswith("# Long module: ")
                           and len(path.read_text().splitlines()[0]) > 40)]
    assert unexplained == [], f"over {LONG} lines without '# Long module: <why>' on the first line"
