"""End to end: a token-authenticated Ray head on loopback, then the two ways cluster.yaml runs a suite.

1. The Jobs API: ``ray job submit --working-dir . -- bplab run quick --address auto``
   (what a laptop does through ``ray dashboard cluster.yaml``'s tunnel).
2. ``ray submit cluster.yaml jobs/run.py -- quick``: run.py, uploaded alone to the head's home,
   runs the project copy ``ray up`` synced to ~/bplab and writes to ~/bplab-runs.

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
* no ``ray stop``: it cannot be scoped to one head (see tests/raycluster.py).

The workload is tiny (one epoch on 160 digits per case) for two shared cores.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from raycluster import AUTH_VARS, BIN, end_head, free_ports as _free_ports, start_head, \
    make_token, private_env, run as _run, tail as _tail

from analysis.rundir import RunDir
from jobs.study import source_digest

# one `ray start --head` at a time when the suite runs in parallel (pytest -n 2): see pyproject.toml
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-start")]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "epochs=1", "--set", "data.train_size=160", "--set", "data.test_size=80",
         "--progress-every", "0", "--no-report"]
QUICK_CASES = {"a", "b", "c", "d", "e", "f"}


# ----------------------------------------------------------------- the head


@pytest.fixture(scope="module")
def head():
    base = Path(tempfile.mkdtemp(prefix="bpjs-", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    home, temp_dir, out = base / "home", base / "ray", base / "out"
    for d in (home, temp_dir, out):
        d.mkdir()
    ports = _free_ports(4)
    gcs_port, dashboard_port = ports[:2]

    env = private_env(home)
    info = {
        "base": base, "home": home, "out": out, "env": env,
        "gcs": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
    }
    tags = [str(temp_dir), info["gcs"]]  # the Ray Client server's command line names only the GCS address
    try:
        # Ray 2.60: `ray start --head` with RAY_AUTH_MODE=token does NOT create a token
        # (ensure_token_if_auth_enabled(create_token_if_missing=False)); it fails without one.
        info["token"] = make_token(env, home)
        start_head(env, temp_dir, ports, 2)
        yield info
    finally:
        end_head(tags, home, base)


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


@pytest.mark.timeout(600)
def test_ray_submit_runs_the_synced_project_copy(head):
    """What `ray submit cluster.yaml jobs/run.py -- quick` does: run.py uploaded alone to the
    head's home (~/run.py) runs the project `ray up` synced to ~/bplab, with --address auto,
    and writes the run under ~/bplab-runs. No PYTHONPATH: only run.py can point Python at the
    copy, and the manifest's source digest says which code ran."""
    home = head["home"]
    shutil.copy(ROOT / "jobs" / "run.py", home / "run.py")
    (home / "bplab").symlink_to(ROOT)  # what file_mounts "~/bplab": "." leaves on the head
    env = {k: v for k, v in head["env"].items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = head["gcs"]  # what `auto` finds on a real head
    result = _run([sys.executable, home / "run.py", "quick", "--only", "a", *SMALL], env, 600, cwd=home)
    assert result.returncode == 0, _tail(result.stdout)
    runs = list((home / "bplab-runs").glob("quick-*"))
    assert len(runs) == 1, (runs, _tail(result.stdout))
    assert str(runs[0]) in result.stdout, _tail(result.stdout)  # the run says where it is
    _check_run(runs[0], {"a"})
    manifest = RunDir.open(str(runs[0])).manifest()
    assert manifest["address"] == "auto"
    # the default folder's name and created_at are one instant (they were seconds apart: Ray's start)
    assert runs[0].name == "quick-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(manifest["created_at"]))
    assert manifest["source_sha256"] == source_digest(ROOT)["source_sha256"]
