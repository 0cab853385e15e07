"""End to end: a token-authenticated Ray head on loopback, then the two ways cluster.yaml runs a suite.

1. The Jobs API: ``ray job submit --working-dir . -- bplab run quick --address auto``
   (what a laptop does through ``ray dashboard cluster.yaml``'s tunnel).
2. ``python jobs/run.py quick --address <GCS>``: what ``ray submit cluster.yaml jobs/run.py -- quick``
   runs on the head.

Token authentication stays ON throughout (Ray 2.60): the head is started with
``RAY_AUTH_MODE=token`` and every client gets the same env and token; a client without them
is checked to be rejected.

Isolation, because other Ray instances may run on this machine at the same time:

* a private ``HOME``: ``ray get-auth-token --generate`` writes the token to
  ``$HOME/.ray/auth_token`` there, so the user's real ``~/.ray/auth_token`` is never read,
  overwritten or deleted;
* a private ``--temp-dir`` and fresh ports (GCS, dashboard, Ray Client server, dashboard agent:
  the last two default to the fixed ports 10001 and 52365, which would clash);
* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it ``ray start`` turns
  ``--node-ip-address=127.0.0.1`` into the machine's network address
  (``services.resolve_ip_for_localhost``), and the GCS and the nodes would listen and talk
  there. With it Ray stays on 127.0.0.1 (single-node only: ``ray start --address`` refuses);
* no ``ray stop``: it kills *every* Ray process on the machine (it matches process names),
  including other people's clusters. Teardown ends only the processes of this head: those
  whose command line names its temp dir or its GCS address, and their children, by pid.

The workload is tiny (one epoch on 160 digits per case) for two shared cores.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from jobs.storage import RunDir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `bplab` of this environment (no pyenv shim lookup through HOME)
SMALL = ["--set", "epochs=1", "--set", "data.train_size=160", "--set", "data.test_size=80",
         "--progress-every", "0", "--no-report"]
QUICK_CASES = {"a", "b", "c", "d", "e", "f"}
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):  # all open at once, so the ports are distinct
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(cmd, env, timeout, cwd=None) -> subprocess.CompletedProcess:
    """Run a command bounded by `timeout`; stdout and stderr together in .stdout."""
    try:
        return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-4000:]}")


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# ----------------------------------------------------------------- ending our processes only


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, environment), from /proc (zombies left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().replace(b"\0", b"\n").decode(errors="replace")
            except OSError:
                environ = ""
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), cmdline, "\n" + environ)
    return table


def _head_pids(tags: list[str], home: Path) -> set[int]:
    """The head's processes: a command line containing one of `tags`, or the private HOME in the
    environment (Ray workers rename themselves to ``ray::...`` and lose their arguments), and
    all their descendants."""
    table = _procs()
    mine = {os.getpid()}
    pid = os.getpid()
    while pid in table and table[pid][0] not in (0, pid):  # never this test process or its ancestors
        pid = table[pid][0]
        mine.add(pid)
    home_var = f"\nHOME={home}\n"
    found = {p for p, (_, cmd, environ) in table.items()
             if any(tag in cmd for tag in tags) or home_var in environ + "\n"}
    grew = True
    while grew:
        children = {p for p, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found - mine


def _end_processes(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` s (gcs_server and raylet take ~10 s to exit on SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
            if not pids:
                return
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, ValueError, IndexError):
        return True


# ----------------------------------------------------------------- the head


@pytest.fixture(scope="module")
def head():
    base = Path(tempfile.mkdtemp(prefix="bpjs-", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    home, temp_dir, out = base / "home", base / "ray", base / "out"
    for d in (home, temp_dir, out):
        d.mkdir()
    gcs_port, dashboard_port, client_port, agent_port = _free_ports(4)

    env = {k: v for k, v in os.environ.items()
           if k not in AUTH_VARS and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    info = {
        "base": base, "home": home, "out": out, "env": env,
        "gcs": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
    }
    tags = [str(temp_dir), info["gcs"]]  # the Ray Client server's command line names only the GCS address
    try:
        # Ray 2.60: `ray start --head` with RAY_AUTH_MODE=token does NOT create a token
        # (ensure_token_if_auth_enabled(create_token_if_missing=False)); it fails without one.
        gen = _run([BIN / "ray", "get-auth-token", "--generate"], env, 60)
        assert gen.returncode == 0, _tail(gen.stdout)
        token_file = home / ".ray" / "auth_token"
        assert token_file.is_file() and token_file.read_text().strip(), "no token written to the private HOME"
        info["token"] = token_file.read_text().strip()

        start = _run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                      f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
                      "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats",
                      f"--temp-dir={temp_dir}"], env, 180)
        assert start.returncode == 0, _tail(start.stdout)
        yield info
    finally:
        _end_processes(_head_pids(tags, home))
        left = _head_pids(tags, home)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"Ray processes of the test head still running: {sorted(left)}"


def _check_run(run_path: Path, cases: set[str]) -> None:
    assert (run_path / "manifest.json").is_file(), f"no manifest in {run_path}"
    run = RunDir.open(str(run_path))
    assert run.manifest()["suite"] == "quick"
    table = run.cases()
    assert set(table["name"]) == cases
    ledger = run.ledger()
    assert set(ledger) == set(table["case_id"])
    states = {entry.name: entry.state for entry in ledger.values()}
    assert states == {name: "done" for name in cases}, states
    metrics = pd.read_parquet(run_path / "metrics")
    assert len(metrics) > 0
    counts = metrics["case_id"].astype(str).value_counts()
    assert set(counts[counts > 0].index) == set(table["case_id"]), counts


# ----------------------------------------------------------------- tests


def test_clients_without_the_token_are_rejected(head):
    """Auth is really on: no RAY_AUTH_MODE (even with the token in ~/.ray) or a wrong token -> refused."""
    no_mode = {k: v for k, v in head["env"].items() if k not in AUTH_VARS}  # HOME still holds the token
    listing = _run([BIN / "ray", "job", "list", "--address", head["dashboard"]], no_mode, 120)
    assert listing.returncode != 0, _tail(listing.stdout)
    assert "Unauthorized" in listing.stdout or "401" in listing.stdout, _tail(listing.stdout)

    wrong = dict(head["env"], RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
    wrong.pop("RAY_AUTH_TOKEN_PATH", None)
    listing = _run([BIN / "ray", "job", "list", "--address", head["dashboard"]], wrong, 120)
    assert listing.returncode != 0, _tail(listing.stdout)
    assert "Forbidden" in listing.stdout or "403" in listing.stdout or "invalid" in listing.stdout.lower(), \
        _tail(listing.stdout)

    status = _run([BIN / "ray", "status", "--address", head["gcs"]], no_mode, 120)  # the GCS (gRPC) too
    assert status.returncode != 0, _tail(status.stdout)
    assert "InvalidAuthToken" in status.stdout or "AuthenticationError" in status.stdout, _tail(status.stdout)

    ok = _run([BIN / "ray", "job", "list", "--address", head["dashboard"]], head["env"], 120)
    assert ok.returncode == 0, _tail(ok.stdout)


def test_ray_job_submit_runs_the_quick_suite(head):
    """`ray job submit --working-dir . -- bplab run quick --address auto`, token auth on."""
    run_path = head["out"] / "job-quick"
    submission_id = f"bplab-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": [".git", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info"]}
    submit = _run([BIN / "ray", "job", "submit", "--address", head["dashboard"], "--submission-id", submission_id,
                   "--working-dir", ROOT, "--runtime-env-json", json.dumps(runtime_env), "--",
                   "bplab", "run", "quick", "--address", "auto", "--out", run_path, *SMALL],
                  head["env"], 900, cwd=ROOT)
    assert submit.returncode == 0, _tail(submit.stdout)
    assert f"Job '{submission_id}' succeeded" in submit.stdout, _tail(submit.stdout)

    status = _run([BIN / "ray", "job", "status", "--address", head["dashboard"], submission_id], head["env"], 120)
    assert status.returncode == 0 and "succeeded" in status.stdout.lower(), _tail(status.stdout)

    _check_run(run_path, QUICK_CASES)
    assert RunDir.open(str(run_path)).manifest()["address"] == "auto"


def test_jobs_run_py_entry_point_on_the_head(head):
    """What `ray submit cluster.yaml jobs/run.py -- quick` runs on the head (one case, to stay cheap)."""
    run_path = head["out"] / "runpy-quick"
    result = _run([sys.executable, ROOT / "jobs" / "run.py", "quick", "--address", head["gcs"],
                   "--out", run_path, "--only", "a", *SMALL], head["env"], 600, cwd=ROOT)
    assert result.returncode == 0, _tail(result.stdout)
    _check_run(run_path, {"a"})
