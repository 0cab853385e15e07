"""The documentation users read stays true: every setting and suite in the README, the
README's test command is what CI runs."""

import re
from pathlib import Path

import pytest

from jobs import suites
from workers.settings import QUIRKS, CaseSettings, DataSpec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_settings_rows() -> dict[str, tuple[str, str]]:
    """The README's settings tables: `name` -> (default as shown, meaning)."""
    return {m.group(1): (m.group(2), m.group(3).replace("\\|", "|"))  # a table cell writes | as \|
            for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \| (.*) \|$", README, re.M)}


@pytest.mark.timeout(60)
def test_the_readme_tables_show_every_setting_with_its_default_and_docstring():
    rows = readme_settings_rows()
    for cls, prefix in ((CaseSettings, ""), (DataSpec, "data.")):
        for name, info in cls.model_fields.items():
            doc = " ".join((info.description or "").split())
            assert doc, f"{prefix}{name}: a field without a docstring"
            assert f"{prefix}{name}" in rows, f"{prefix}{name} missing from the README's settings tables"
            default = info.get_default(call_default_factory=True)
            shown = default.name if isinstance(default, DataSpec) else str(default)
            assert rows[f"{prefix}{name}"] == (shown, doc), f"{prefix}{name}: the README says otherwise"
    assert set(rows) - {f"{p}{n}" for cls, p in ((CaseSettings, ""), (DataSpec, "data.")) for n in cls.model_fields} \
        == set(), "a README row for a setting that does not exist"
    for quirk in QUIRKS:
        assert f"`{quirk}`" in README


@pytest.mark.timeout(60)
def test_every_builtin_suite_loads_and_is_in_the_readme():
    for name in suites.builtin_names():
        suite = suites.load_suite(name)
        assert len(suite.cases) >= 3 and suite.description
        assert f"`{name}`" in README, name


@pytest.mark.timeout(30)
def test_the_readme_commands_table_names_every_command_and_option_of_run():
    """The Commands table: a row per `bplab` command, and every flag of `bplab run` in its row."""
    import argparse

    from jobs.cli import build_parser
    from jobs.options import StudyOptions, flag_of

    rows = re.findall(r"^\| `bplab ([a-z]+)( [^`]*)?` \|", README, re.M)
    shown = {name for name, _ in rows}
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) - shown == set(), "a command missing from the README's Commands table"
    run_row = next(line for line in README.splitlines() if line.startswith("| `bplab run SUITE"))
    for name in StudyOptions.model_fields:
        if name != "suite":
            assert flag_of(name) in run_row, f"{flag_of(name)} missing from the README's `bplab run` row"


@pytest.mark.timeout(30)
def test_the_readme_run_directory_names_every_entry_of_the_layout():
    """The README's Run directory block has a line for every file and folder a run may hold
    (analysis.rundir.layout.LAYOUT_NAMES; the hidden lease takeover marker apart)."""
    from analysis.rundir.layout import LAYOUT_NAMES

    block = README.split("## Run directory", 1)[1].split("```", 2)[1]
    listed = {m.group(1) for m in re.finditer(r"^RUN/([A-Za-z0-9_.]+)", block, re.M)}
    assert {name for name in LAYOUT_NAMES if not name.startswith(".")} - listed == set()


@pytest.mark.timeout(10)
def test_ci_runs_the_readme_test_command():
    command = "pip install -e '.[test]' && python -m pytest -q"
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.timeout(30)
def test_comments_and_docs_speak_to_a_reader_of_the_repository():
    import re

    pattern = re.compile(r"\bthe (issue|brief)\b", re.IGNORECASE)
    found = []
    for folder in ("jobs", "workers", "analysis", "benchmarks", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".json") and path.name != "test_docs.py":
                found += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    found += [f"README.md:{n}" for n, line in enumerate(README.splitlines(), 1) if pattern.search(line)]
    assert not found, f"text that refers to a task instead of the code: {found}"


@pytest.mark.timeout(30)
def test_no_test_imports_another_test_file():
    """What tests share lives in tests/helpers.py (or tests/raycluster.py for `ray start` heads)."""
    import ast

    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {name}" for name in names if name.split(".")[-1].startswith("test_")]
    assert not found, found
