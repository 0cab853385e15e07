"""The quiet terminal on a real run: the cases' own output (TensorFlow, absl, CUDA loader
messages) lands in RUN/logs/<case>.log, never on the terminal, and redirected output carries no
ANSI codes. `bplab logs RUN CASE` prints a case's log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import bplab

ROOT = Path(__file__).resolve().parents[1]
BANNERS = ("onednn", "tensorflow binary is optimized", "cuda", "absl", "ray_dedup", "dedup", "cpu_feature_guard")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Two cases of quick, two steps each, run as a user would: TensorFlow's logging at its
    default level and Ray's log deduplication on (the test session turns both down)."""
    out = tmp_path_factory.mktemp("quiet") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_DEDUP_LOGS")}
    env["PYTHONPATH"] = str(ROOT)
    result = bplab("run", "quick", "--set", "epochs=1", "--set", "steps_per_epoch=2", "--only", "a", "b",
                   "--out", str(out), "--no-report", "--progress-every", "1", env=env, timeout=840)
    return out, result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_terminal_holds_bplab_lines_only(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stderr[-2000:]
    terminal = result.stdout + result.stderr
    assert "\x1b[" not in terminal  # redirected: plain text
    lines = [line for line in terminal.splitlines() if line.strip()]
    noisy = [line for line in lines if any(word in line.lower() for word in BANNERS)]
    assert not noisy, noisy
    assert all(line.startswith("[bplab") for line in lines), [l for l in lines if not l.startswith("[bplab")]
    assert any(re.search(r"\] a: running on ", line) for line in lines)
    assert re.search(r"2 cases: 2 done, 0 running, 0 pending, 0 failed, 0 diverged; elapsed \d+m\d\ds", terminal)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_case_logs_hold_the_tensorflow_banner(quick_run):
    out, _ = quick_run
    for name in ("a", "b"):
        text = (out / "logs" / f"{name}.log").read_text()
        assert text.startswith(f"===== bplab: output of case {name},")
        assert "This TensorFlow binary is optimized" in text or "oneDNN" in text, text[:2000]
    shown = bplab("logs", str(out), "a")
    assert shown.returncode == 0 and shown.stdout == (out / "logs" / "a.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_logs_of_an_unknown_case_is_a_one_line_error(quick_run):
    out, _ = quick_run
    result = bplab("logs", str(out), "zz")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no case 'zz'" in result.stderr and "a, b" in result.stderr


CAPTURE = """
import os, sys
from workers import logs
path = logs.start_capture(sys.argv[1])
print("from python")
os.write(2, b"from fd 2, as C++ logging writes\\n")
offset = logs.output_offset()
os.write(1, b"x" * 5000 + b"\\n")
text, end = logs.case_output_since(offset, limit=100)
first, _ = logs.case_output_since(0)
open(sys.argv[2], "w").write(repr((path, first, text, end)))  # stdout is the capture now
"""


@pytest.mark.timeout(60)
def test_capture_takes_fd_1_and_2_and_keeps_the_tail(tmp_path):
    report = tmp_path / "report.txt"
    result = subprocess.run([sys.executable, "-c", CAPTURE, str(tmp_path / "cap"), str(report)], capture_output=True,
                            text=True, timeout=50, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # nothing reached the process's original stdout/stderr
    path, first, text, end = eval(report.read_text())  # noqa: S307 - our own repr
    assert first.startswith("from python\nfrom fd 2, as C++ logging writes\n")
    assert text == "[... 4901 bytes of output dropped ...]\n" + "x" * 99 + "\n"
    assert end == os.path.getsize(path) == len(first.encode())


@pytest.mark.timeout(60)
def test_case_logs_append_cap_and_tail(tmp_path):
    from analysis.rundir import RunDir
    from workers.logs import CaseLogs, read_case_log

    run = RunDir(tmp_path / "run")
    logs = CaseLogs(run, limit=1000)
    logs.append("a", "first line\n")
    for index in range(100):
        logs.append("a", f"line {index:03d} " + "." * 40 + "\n")
    text = read_case_log(run, "a")
    assert len(text.encode()) <= 2000 and text.endswith("line 099 " + "." * 40 + "\n")
    assert "first line" not in text  # cut to the tail
    assert logs.tail("a", 2) == ["line 098 " + "." * 40, "line 099 " + "." * 40]
    assert read_case_log(run, "b") is None


@pytest.mark.timeout(300)
def test_a_failed_case_shows_its_last_lines(tmp_path):
    import io

    from jobs import plan, suites
    from jobs.driver import Driver
    from analysis.rundir import RunDir

    suite = suites.select(suites.load_suite("moons-quick"), ["deep"])
    planned = plan.make_plan(suite, plan.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
    run = RunDir.create(tmp_path / "run", {"suite": suite.name}, [p.row() for p in planned])
    out = io.StringIO()
    driver = Driver(run, planned, {}, out=out, progress_every=0)
    state = next(iter(driver.cases.values()))
    driver.logs.append("deep", "".join(f"noise {i}\n" for i in range(20)) + "Traceback (most recent call last):\nBoom\n")
    driver._finish(state, {"ok": False, "error_type": "RuntimeError", "error": "Boom", "error_class": "bug",
                           "traceback": "Traceback (most recent call last):\nRuntimeError: Boom\n"})
    text = out.getvalue()
    assert "deep: failed (bug: RuntimeError: Boom)" in text
    assert f"bplab logs {run.location} deep" in text and "    | RuntimeError: Boom" in text
    assert "    | noise 19" in text and "noise 10" not in text  # the last few lines only
    assert "RuntimeError: Boom" in (tmp_path / "run" / "logs" / "deep.log").read_text()


@pytest.mark.timeout(60)
def test_logs_of_a_case_that_printed_nothing_says_so(tmp_path, monkeypatch, capsys):
    """A case that wrote no output (a worker's start-up lines go to its first case): `bplab logs`
    says it printed nothing once the case has ended, and 'no output yet' while it runs."""
    import dataclasses

    from tests.helpers import make_existing_run, run_main

    run = make_existing_run(tmp_path / "run")  # case a, running, no logs/
    result = run_main(["logs", tmp_path / "run", "a"], tmp_path, monkeypatch, capsys)
    assert result.code == 0 and result.stdout == "" and "has no output" in result.stderr and "yet" in result.stderr
    run.write_entry(dataclasses.replace(run.entry("a-0123456789"), state="done"))
    result = run_main(["logs", tmp_path / "run", "a"], tmp_path, monkeypatch, capsys)
    assert result.code == 0 and result.stdout == "", result
    assert result.stderr.startswith("bplab: case a printed nothing (") and "yet" not in result.stderr, result.stderr
