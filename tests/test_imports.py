"""The package layers, read from the source with `ast` (nothing is imported).

Lowest first: workers (the trainer side; imports no other bplab package), analysis.rundir (the
run directory's format), the rest of analysis, jobs. A module may import its own layer and the
ones below it, never one above; the imports (also those inside functions) form no circle.
tests/ and benchmarks/ may import anything. A module over 600 lines says why on its first line.
Only analysis/rundir knows a run directory's file names: no other module imports its layout or
joins one of those names into a path.
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


# ---------------------------------------------------------------------- run-directory names

#: Path-building calls: a run-directory name given to one of these builds a path into a run.
PATH_CALLS = {"join", "Path", "PurePath", "PurePosixPath", "joinpath", "path", "FileSelector", "open", "glob",
              "rglob", "read_parquet", "read_table", "get_file_info", "open_input_stream", "open_output_stream",
              "exists", "is_dir", "is_file", "iterdir", "delete_file", "delete_dir"}
#: (module file, name): uses of a run-directory name that are not paths into a run.
NOT_INTO_A_RUN = {
    # a remote run's event files go to ./tensorboard/<run folder> in the current folder
    ("analysis/tensorboard.py", "tensorboard"),
}


def run_names() -> set[str]:
    """Every top-level name of a run directory (analysis.rundir.layout.LAYOUT_NAMES); a path
    deeper in a run (a ledger file, a partition) starts with one of them."""
    from analysis.rundir import layout

    return set(layout.LAYOUT_NAMES)


def _names_in(text: str, names: set[str]) -> set[str]:
    """The run names `text` (a literal, or a literal part of an f-string) holds as a path part:
    the whole text, or a part between slashes (``metrics/case_id=``, ``RUN/ledger``)."""
    parts = {p.split("=")[0] for p in text.replace("\\", "/").split("/")}
    return {n for n in names if text == n or (("/" in text) and n in parts)}


def layout_uses(root: Path = ROOT, names: set[str] | None = None) -> list[str]:
    """Modules outside analysis/rundir that import the layout, or give a run-directory name
    (a literal) to a path-building operation: ``/``, os.path.join and the like, a path in an
    f-string."""
    names = run_names() if names is None else names
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("analysis/rundir/"):
                continue
            tree = ast.parse(path.read_text(), rel)
            for node in ast.walk(tree):
                hits: set[str] = set()
                if isinstance(node, ast.ImportFrom) and node.module and (
                        node.module == "analysis.rundir.layout"
                        or (node.module == "analysis.rundir" and any(a.name == "layout" for a in node.names))):
                    found.append(f"{rel}:{node.lineno} imports analysis.rundir.layout")
                    continue
                if isinstance(node, ast.Import) and any(a.name == "analysis.rundir.layout" for a in node.names):
                    found.append(f"{rel}:{node.lineno} imports analysis.rundir.layout")
                    continue
                operands = []
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                    operands = [node.left, node.right]
                elif isinstance(node, ast.Call):
                    func = node.func
                    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                    if called in PATH_CALLS:
                        operands = [*node.args, *(k.value for k in node.keywords)]
                for operand in operands:
                    if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
                        hits |= {n for n in names if operand.value == n or operand.value.startswith(n + "{")} | \
                            _names_in(operand.value, names)
                    elif isinstance(operand, ast.JoinedStr):
                        first = operand.values[0] if operand.values else None
                        if isinstance(first, ast.Constant) and isinstance(first.value, str) and any(
                                first.value.startswith(n) for n in names):
                            hits |= {n for n in names if first.value.split("/")[0].startswith(n)}
                if isinstance(node, ast.JoinedStr):  # f"{run}/ledger/{case}.json"
                    for part in node.values:
                        if isinstance(part, ast.Constant) and isinstance(part.value, str) and "/" in part.value:
                            hits |= {n for n in names if n in {p.split("=")[0] for p in part.value.split("/")[1:]}}
                for name in sorted(hits):
                    if (rel, name) not in NOT_INTO_A_RUN:
                        found.append(f"{rel}:{node.lineno} builds a path with {name!r}")
    return sorted(set(found))


@pytest.mark.timeout(60)
def test_only_the_run_directory_package_knows_its_file_names():
    """Readers and the driver reach a run's files through analysis.rundir.RunDir: no module
    outside analysis/rundir imports the layout or joins a run-directory name into a path."""
    assert layout_uses() == []


@pytest.mark.timeout(60)
def test_the_name_check_catches_what_it_looks_for(tmp_path):
    """The check on a tree of its own: each way of building a run path is found, the
    package's own modules and plain words are not."""
    for name, text in {
        "analysis/rundir/run.py": "from analysis.rundir.layout import LEDGER\np = root / 'ledger'\n",
        "analysis/a.py": "from analysis.rundir import layout\n",
        "analysis/b.py": "from analysis.rundir.layout import partition\n",
        "analysis/c.py": "import os\np = os.path.join(root, 'boundary', case)\n",
        "analysis/d.py": "p = run_dir / 'ledger'\n",
        "jobs/e.py": "p = f'{run}/metrics/case_id={case}'\n",
        "jobs/f.py": "p = Path(run) / 'manifest.json'\n",
        "jobs/g.py": "p = folder / f'report{suffix}'\n",
        "jobs/h.py": "row = {'metrics': 1, 'report': 2}\nprint('the report')\nq = Path('reports') / name\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert layout_uses(tmp_path) == [
        "analysis/a.py:1 imports analysis.rundir.layout",
        "analysis/b.py:1 imports analysis.rundir.layout",
        "analysis/c.py:2 builds a path with 'boundary'",
        "analysis/d.py:1 builds a path with 'ledger'",
        "jobs/e.py:1 builds a path with 'metrics'",
        "jobs/f.py:1 builds a path with 'manifest.json'",
        "jobs/g.py:1 builds a path with 'report'",
    ]
