"""What a user sees after a crash, and a few lines that used to read wrong.

- A run whose driver is gone (its lease expired, its process dead on this host, or its lease
  removed while cases were left running): `bplab status` and `bplab runs` show the unfinished
  cases as interrupted, when the driver was last seen and `bplab run --resume RUN`.
- A folder holding only `driver.lock` (a driver killed in its first seconds): `bplab run
  --resume`, `status` and `report` say so in one line (exit 2) with the command that starts
  it again; that command is accepted.
- The report header: one line per data set; the per-step panels' axis is numbered from 1.
- The event line of a CPU case names its CPU slots; a venv in the checkout is not "dirty".

The commands run in-process (tests.helpers.run_main, `ray` stubbed out); one slow
test SIGKILLs real `bplab run` processes, once in their first seconds and once mid-case.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.rundir import RunDir
from analysis.rundir.layout import LOCK
from analysis.rundir.liveness import when
from tests.helpers import (TWO_LR, assert_refused, bplab, make_existing_run, run_main, start_bplab, tree_state,
                           wait_for, write_run)

ROOT = Path(__file__).resolve().parents[1]
CASE_ID = "a-0123456789"  # make_existing_run's one case, left running


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    def run(*args):
        return run_main(list(args), tmp_path, monkeypatch, capsys)
    return run


def set_ledger_time(location: Path, moment: float) -> None:
    """Back-date every ledger entry (and its backup copy) as if the driver last wrote at `moment`."""
    for path in (location / "ledger").glob("*.json*"):
        if path.name.endswith((".json", ".json.bak")):
            entry = json.loads(path.read_text())
            entry["updated_at"] = moment
            path.write_text(json.dumps(entry))


def write_lock(location: Path, **record) -> None:
    (location / LOCK).write_text(json.dumps({"token": "a-dead-driver", **record}))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def case_line(stdout: str, name: str = "a") -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.split()[:1] == [name])


# ---------------------------------------------------------------------- a driver that is gone


@pytest.mark.timeout(60)
def test_status_and_runs_show_an_expired_lease_as_interrupted(tmp_path, cli):
    location = tmp_path / "runs" / "old-run"
    make_existing_run(location)  # case a: running, two commits
    seen = time.time() - 600
    set_ledger_time(location, seen - 300)
    write_lock(location, host="node-elsewhere", pid=4242, heartbeat=seen)  # another host, silent for 10 min
    before = tree_state(location)

    status = cli("status", location)
    assert status.code == 0, status.stdout + status.stderr
    assert case_line(status.stdout)[1] == "interrupted", status.stdout
    assert not any(line.split()[1:2] == ["running"] for line in status.stdout.splitlines())
    line = status.stdout.strip().splitlines()[-1]
    assert "pid 4242 on node-elsewhere" in line
    assert f"last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seen))} UTC" in line, line
    assert re.search(r"\(10m0\ds ago\)", line), line
    assert line.endswith(f"continue with: bplab run --resume {location}"), line

    listing = cli("runs", tmp_path / "runs")
    assert listing.code == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("old-run"))
    assert "1 interrupted" in row and "running" not in row, row
    assert f"bplab run --resume {tmp_path / 'runs' / 'old-run'}" in row, row
    assert tree_state(location) == before  # looking changes nothing

    # the same run with its driver alive (this process holds the lease): running, no resume advice
    (location / LOCK).unlink()
    run = RunDir.open(str(location))
    run.take_lease("alive")
    try:
        status = cli("status", location)
        assert case_line(status.stdout)[1] == "running", status.stdout
        assert "--resume" not in status.stdout and f"pid {os.getpid()} on {platform.node()}" in status.stdout
        row = next(line for line in cli("runs", tmp_path / "runs").stdout.splitlines() if line.startswith("old-run"))
        assert "1 running" in row and "--resume" not in row, row
    finally:
        run.release_lease("alive")


@pytest.mark.timeout(60)
def test_a_dead_process_on_this_host_or_no_lease_at_all_means_interrupted(tmp_path, cli):
    location = tmp_path / "old-run"
    make_existing_run(location)
    written = time.time() - 42
    set_ledger_time(location, written)
    # the lease of a process that is gone, on this host, with a fresh heartbeat: dead all the same
    write_lock(location, host=platform.node(), pid=dead_pid(), heartbeat=time.time())
    status = cli("status", location)
    assert case_line(status.stdout)[1] == "interrupted", status.stdout
    assert status.stdout.strip().endswith(f"bplab run --resume {location}")
    # no lease at all, a case left running: last seen = the ledger's last write
    (location / LOCK).unlink()
    status = cli("status", location)
    assert case_line(status.stdout)[1] == "interrupted", status.stdout
    assert f"last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(written))} UTC" in status.stdout
    # a case the driver never started stays pending; one stopped by Ctrl-C (pending, attempted) is interrupted
    run = RunDir.open(str(location))
    entry = run.entry(CASE_ID)
    run.write_entry(dataclasses.replace(entry, state="pending", reason_class="interrupted", reason="stopped by the user"))
    status = cli("status", location)
    assert case_line(status.stdout)[1] == "interrupted" and "stopped by the user" in status.stdout, status.stdout
    run.write_entry(dataclasses.replace(run.entry(CASE_ID), state="done", reason_class=None, reason=None))
    status = cli("status", location)
    assert case_line(status.stdout)[1] == "done" and "--resume" not in status.stdout, status.stdout


@pytest.mark.timeout(120)
def test_report_shows_a_dead_drivers_cases_as_interrupted_with_the_resume_command(tmp_path, cli):
    import pandas as pd

    location = tmp_path / "old-run"
    make_existing_run(location)  # case a: running, two commits
    seen = time.time() - 600
    set_ledger_time(location, seen - 300)
    write_lock(location, host="node-elsewhere", pid=4242, heartbeat=seen)  # another host, silent for 10 min
    out = tmp_path / "report"
    result = cli("report", location, "--out", out)
    assert result.code == 0, result.stdout + result.stderr
    text = (out / "report.md").read_text()
    assert pd.read_csv(out / "not_done.csv")["state"].tolist() == ["interrupted"]
    assert "1 cases: 1 interrupted." in text and "running" not in text, text[:3000]
    line = next(line for line in text.splitlines() if "no driver holds the run" in line)
    assert "pid 4242 on node-elsewhere" in line
    assert f"last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seen))} UTC" in line, line
    assert line.endswith(f"continue with: bplab run --resume {location}"), line

    # its driver alive (this process holds the lease): the ledger's running, no resume advice
    (location / LOCK).unlink()
    run = RunDir.open(str(location))
    run.take_lease("alive")
    try:
        result = cli("report", location, "--out", tmp_path / "report-live")
        assert result.code == 0, result.stdout + result.stderr
        text = (tmp_path / "report-live" / "report.md").read_text()
        assert pd.read_csv(tmp_path / "report-live" / "not_done.csv")["state"].tolist() == ["running"]
        assert "interrupted" not in text and "--resume" not in text, text[:3000]
    finally:
        run.release_lease("alive")


# ---------------------------------------------------------------------- a folder holding only driver.lock


@pytest.mark.timeout(60)
def test_a_folder_holding_only_driver_lock_says_what_happened_and_what_to_type(tmp_path, cli):
    from jobs.study import start_details

    location = tmp_path / "runs" / "quick-early"
    RunDir(str(location)).take_lease("killed-early", details=start_details("quick", ["a"], ["epochs=1"]))
    record = json.loads((location / LOCK).read_text())
    assert {record["suite"], *record["only"], *record["overrides"]} == {"quick", "a", "epochs=1"}
    record["pid"] = dead_pid()  # the driver was killed before it created the run
    (location / LOCK).write_text(json.dumps(record))
    typed = f"bplab run quick --only a --set epochs=1 --out {location}"
    before = tree_state(location)
    for argv in (["run", "--resume", location], ["status", location], ["report", location]):
        line = assert_refused(cli(*argv), f"{location} holds only {LOCK}", "so nothing ran", typed)
        assert line.endswith(typed), line
        assert "no manifest.json" not in line
    assert tree_state(location) == before
    row = next(line for line in cli("runs", tmp_path / "runs").stdout.splitlines() if line.startswith("quick-early"))
    assert row.endswith(typed), row

    # a lease without the suite (an older driver): the shape of the command, SUITE to fill in
    (location / LOCK).write_text(json.dumps({"host": platform.node(), "pid": dead_pid(), "token": "t",
                                             "heartbeat": time.time()}))
    assert_refused(cli("run", "--resume", location), f"bplab run SUITE --out {location}")

    # the driver still alive in its first seconds: wait for it
    (location / LOCK).unlink()
    RunDir(str(location)).take_lease("starting")
    assert_refused(cli("status", location), "is being created by", f"pid {os.getpid()}")
    (location / LOCK).unlink()

    # the command it gives is accepted: the dead lease is taken over and the run starts (up to Ray)
    (location / LOCK).write_text(json.dumps({**record, "pid": dead_pid()}))
    started = cli(*typed.split()[1:])
    assert "ray.init" in started.ray_log, started.stdout + started.stderr


# ---------------------------------------------------------------------- the report


@pytest.mark.timeout(120)
def test_report_header_has_one_line_per_data_set_and_the_step_axis_starts_at_epoch_1(tmp_path, cli, monkeypatch):
    import analysis.figures as figures_module  # where the report's figures are saved
    from workers.data import identify, load_dataset
    from workers.settings import DataSpec

    mnist = tmp_path / "mnist"  # files named as the official ones, with other bytes: not official
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (mnist / name).write_bytes(name.encode())
    identity = identify("mnist", str(mnist))
    assert identity["official"] is False
    digits = load_dataset(DataSpec("digits")).summary()
    fake_mnist = {**digits, "name": "mnist", "official": False, "files_digest": identity["digest"],
                  "identity": identity, "source": str(mnist), "fingerprint": "f" * 64}
    run = write_run(tmp_path / "sweep", TWO_LR)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["data_sets"] = [digits, fake_mnist]
    manifest["data_fingerprints"] = {"digits": digits["fingerprint"], "mnist": "f" * 64}
    (run / "manifest.json").write_text(json.dumps(manifest))

    axes = {}
    original = figures_module._save

    def save(fig, out_dir, name, **kwargs):
        axes[name] = [(ax.get_xlabel(), ax.get_xlim(), [t.get_text() for t in ax.get_xticklabels()],
                       list(ax.get_xticks()), [line.get_xdata() for line in ax.get_lines()]) for ax in fig.axes]
        return original(fig, out_dir, name, **kwargs)

    monkeypatch.setattr(figures_module, "_save", save)
    result = cli("report", run)
    assert result.code == 0, result.stderr
    text = (run / "report" / "report.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("- data set")]
    assert len(lines) == 2, text[:3000]
    assert lines[0].startswith("- data set **digits**: official (scikit-learn's bundled digits")
    assert f"data fingerprint `{digits['fingerprint'][:16]}`" in lines[0]
    assert lines[1].startswith("- data set **mnist**: not official (")
    assert identity["reason"] in lines[1] and f"files digest `{identity['digest']}`" in lines[1]
    assert "is not the official md5:f68b3c2dcbeaaa9fbdd348bbdeb94873" in lines[1]
    assert not any(line.startswith(("- data sets:", "- data fingerprints:")) for line in text.splitlines())
    assert "[{" not in text.split("## ", 1)[0]  # no JSON in the header

    # the per-step panel: 2 epochs of 2 steps; its axis names epochs from 1, each under its own steps
    per_step = [a for a in axes["curves_train_accuracy.png"] if a[0].startswith("epoch (from 1; per step)")]
    assert len(per_step) == 1
    label, xlim, ticks, positions, xdata = per_step[0]
    assert ticks == ["1", "2"] and xlim[0] == 0, (ticks, xlim)
    for line in xdata:  # steps 1-2 are epoch 1, steps 3-4 epoch 2 (write_run's order)
        epoch_of = [int(ticks[min(range(len(positions)), key=lambda i: abs(positions[i] - x + 1e-9))]) for x in line]
        assert epoch_of == [1, 1, 2, 2], (list(line), positions)


@pytest.mark.timeout(60)
def test_step_axis_labels_epochs_from_1_for_long_runs(tmp_path):
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    from analysis.plots import plot_step_curves

    for epochs in (1, 3, 30, 250):
        steps = 4
        table = pd.DataFrame({"group": "g", "step": range(epochs * steps), "value": 1.0, "smoothed": 1.0,
                              "epoch": [(i + 1) / steps for i in range(epochs * steps)]})  # epochs completed
        ax = Figure().subplots()
        plot_step_curves(ax, table)
        labels = [t.get_text() for t in ax.get_xticklabels()]
        positions = ax.get_xticks()
        assert labels[0] == "1" and labels[-1] == str(epochs) and ax.get_xlim() == (0, epochs), (epochs, labels)
        assert all(label.isdigit() for label in labels)
        np.testing.assert_allclose(positions, [int(label) - 0.5 for label in labels])  # the middle of each epoch


# ---------------------------------------------------------------------- the event line, the venv


@pytest.mark.timeout(30)
def test_event_line_says_cpu_slots_or_which_gpu():
    from jobs.driver import placement
    from jobs.plan import PlannedCase

    def planned(cpus, gpus):
        return PlannedCase(None, "x", cpus, gpus, 0, 0, None)

    assert placement("192.0.2.2", planned(1.0, 0.0), {"gpu_ids": []}) == "192.0.2.2, 1 CPU slot"
    assert placement("192.0.2.2", planned(2.0, 0.0), {}) == "192.0.2.2, 2 CPU slots"
    assert placement("10.0.0.3", planned(1.0, 1.0), {"gpu_ids": ["0"], "gpu_names": ["Tesla T4"]}) == \
        "10.0.0.3, GPU 0 (Tesla T4) + 1 CPU slot"
    assert placement("10.0.0.3", planned(4.0, 0.5), {"gpu_ids": ["1"], "gpu_names": []}) == \
        "10.0.0.3, 0.5 of GPU 1 + 4 CPU slots"
    assert placement("10.0.0.3", planned(2.0, 2.0), {"gpu_ids": ["0", "1"], "gpu_names": ["A100", "A100"]}) == \
        "10.0.0.3, GPUs 0,1 (A100) + 2 CPU slots"


@pytest.mark.timeout(60)
def test_a_venv_inside_the_checkout_is_not_an_uncommitted_change(tmp_path):
    from jobs.study import _git, source_digest

    checkout = tmp_path / "checkout"
    (checkout / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", checkout / ".gitignore")  # the repository's own
    (checkout / "jobs" / "a.py").write_text("A = 1\n")

    def git(*args):
        subprocess.run(["git", "-C", str(checkout), *args], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t"})

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "start")
    assert _git(checkout)["git_dirty"] is False
    digest = source_digest(checkout)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(checkout / ".venv")], check=True, timeout=60)
    for folder in ("venv", ".env"):
        (checkout / folder / "lib").mkdir(parents=True)
        (checkout / folder / "lib" / "site.py").write_text("x = 1\n")
    assert any((checkout / ".venv").rglob("*")) and _git(checkout)["git_dirty"] is False
    assert source_digest(checkout) == digest
    (checkout / "stray.txt").write_text("an uncommitted file\n")  # the check still sees real changes
    assert _git(checkout)["git_dirty"] is True


# ---------------------------------------------------------------------- real drivers, really killed


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the driver alone (as the OOM killer or a lost terminal would), reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _stop_leftovers(process: subprocess.Popen) -> None:
    """The processes the killed driver started (its session), if any outlived it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _running_with_a_commit(location: Path):
    try:
        entries = [json.loads(p.read_text()) for p in (location / "ledger").glob("*.json")]
    except (OSError, ValueError):
        return None
    return any(e.get("state") == "running" and e.get("commit_seq", 0) >= 1 for e in entries)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_drivers_killed_early_and_mid_case_are_explained_and_continued(tmp_path):
    out = tmp_path / "runs" / "quick-killed"
    options = ["--only", "a", "--set", "epochs=40", "--set", "steps_per_epoch=3"]
    typed = ["run", "quick", *options, "--out", str(out)]
    common = ["--checkpoint-every", "2", "--progress-every", "0", "--no-report"]

    # 1. killed in its first seconds: the lease is taken, the run not created yet
    first = start_bplab(*typed, *common, cwd=tmp_path, log=tmp_path / "first.log", new_session=True)
    try:
        wait_for(lambda: (out / LOCK).is_file(), 120, LOCK, first, log=tmp_path / "first.log", every=0.02)
        _kill(first)
    finally:
        _stop_leftovers(first)
    assert sorted(p.name for p in out.iterdir()) == [LOCK], "the run was created before the kill"
    resumed = bplab("run", "--resume", out, cwd=tmp_path)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr
    message = resumed.stderr.strip()
    assert f"holds only {LOCK}" in message and f"pid {first.pid}" in message, message
    command = message.split("start it again with: ", 1)[1]
    assert command == "bplab " + " ".join(typed), message

    # 2. the command it gives, killed mid-case after a commit
    second = start_bplab(*command.split()[1:], *common, cwd=tmp_path, log=tmp_path / "second.log", new_session=True)
    try:
        wait_for(lambda: _running_with_a_commit(out), 300, "a running case with a commit", second,
                 log=tmp_path / "second.log", every=0.02)
        _kill(second)
        killed_at = time.time()
    finally:
        _stop_leftovers(second)
    events = (tmp_path / "second.log").read_text()
    assert re.search(r"\] a: running on \S+, 1 CPU slot \(attempt 1", events), events[-2000:]
    assert " gpu -" not in events

    status = bplab("status", out, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert case_line(status.stdout)[1] == "interrupted", status.stdout
    last = status.stdout.strip().splitlines()[-1]
    assert f"pid {second.pid} on {platform.node()} was last seen" in last, last
    seen = re.search(r"last seen (\S+ \S+) UTC", last).group(1)
    assert abs(time.mktime(time.strptime(seen, "%Y-%m-%d %H:%M:%S")) - time.mktime(time.gmtime(killed_at))) < 15
    assert last.endswith(f"continue with: bplab run --resume {out}"), last
    listing = bplab("runs", tmp_path / "runs", cwd=tmp_path)
    assert "1 interrupted" in listing.stdout and f"bplab run --resume {out}" in listing.stdout, listing.stdout

    # 3. the command status gives finishes the case
    done = bplab(*last.split("continue with: ", 1)[1].split()[1:], *common[2:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    status = bplab("status", out, cwd=tmp_path)
    assert case_line(status.stdout)[1] == "done" and "--resume" not in status.stdout, status.stdout
