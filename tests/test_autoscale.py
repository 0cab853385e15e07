"""A cold autoscaling cluster, as `ray up` starts one: the head alone (0 GPU), GPU workers
only when the autoscaler launches them (`min_workers: 0`).

Ray's fake multi-node provider stands in for the cloud: `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=FILE` runs the real autoscaler (v1), which starts "nodes" as local raylets
with the resources of their node type. Ray 2.60's wheel lacks fake_multi_node/example.yaml, so
the config is written by tests/raycluster.py; it declares bplab_trainer on the GPU type only, as cluster.yaml does.

Checked, token authentication on, through the README's own commands:
- `bplab plan quick --address GCS` sees the node types (2 at once fully scaled, 0 now) and
  the data as the head sees it;
- `ray job submit ... -- bplab run quick --address auto` from a cold start: every case on an
  autoscaled GPU worker with one GPU, none on the head (node ids against `ray list nodes`),
  the run under ~/bplab-runs on the head, printed;
- `bplab fetch GCS RUN DEST` brings it to "the laptop", and `bplab report` works there, its
  header carrying the source digest of the code that ran.

The head and its fake nodes are ended by pid (tests/raycluster.py), never by `ray stop`.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from raycluster import BIN, autoscaling_head, run, tail

from analysis.rundir import RunDir
from jobs.study import source_digest

# one `ray start --head` at a time when the suite runs in parallel (pytest -n 2): see pyproject.toml
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-start")]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "epochs=1", "--set", "steps_per_epoch=2", "--progress-every", "0", "--no-report"]
EXCLUDES = {"excludes": [".git", "runs", "reports", "**/__pycache__", ".pytest_cache", "*.egg-info"]}


@pytest.fixture(scope="module")
def cluster():
    with autoscaling_head() as info:
        yield info


def _nodes(cluster) -> list[dict]:
    listing = run([BIN / "ray", "list", "nodes", "--address", cluster["dashboard"], "--format", "json", "--detail"],
                  cluster["env"], 120)
    assert listing.returncode == 0, tail(listing.stdout)
    return json.loads(listing.stdout[listing.stdout.index("["):])


@pytest.mark.timeout(420)
def test_cold_autoscaling_cluster_round_trip(cluster):
    env = cluster["env"]
    before = [n for n in _nodes(cluster) if n["state"] == "ALIVE"]
    assert len(before) == 1 and before[0]["is_head_node"], before  # a cold start: the head alone

    # the plan asks the cluster: node types its autoscaler can launch, and the data on the head
    clock = time.monotonic()
    plan = run([BIN / "bplab", "plan", "quick", "--address", cluster["gcs"]], env, 180, cwd=cluster["laptop"])
    assert plan.returncode == 0, tail(plan.stdout)
    assert "2 at once when the Ray cluster at" in plan.stdout and "(gpu_worker x2: 2 slots), 0 on the nodes alive now" \
        in plan.stdout, tail(plan.stdout)
    assert re.search(r"^a\s+a-\w+\s+standard\s+digits\s+1\s+1\s", plan.stdout, re.M), tail(plan.stdout)  # 1 GPU
    assert "data digits on " in plan.stdout, tail(plan.stdout)

    print(f"plan took {time.monotonic() - clock:.0f}s")
    # the README's job submission, from a cold start, no --out: the run lands in ~/bplab-runs on the head
    submission = f"bplab-as-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    submit = run([BIN / "ray", "job", "submit", "--address", cluster["dashboard"], "--submission-id", submission,
                  "--working-dir", ROOT, "--runtime-env-json", json.dumps(EXCLUDES), "--",
                  "bplab", "run", "quick", "--address", "auto", *TINY], env, 420, cwd=ROOT)
    assert submit.returncode == 0 and f"Job '{submission}' succeeded" in submit.stdout, tail(submit.stdout)
    runs = list((cluster["home"] / "bplab-runs").glob("quick-*"))
    assert len(runs) == 1, (runs, tail(submit.stdout))
    assert str(runs[0]) in submit.stdout, tail(submit.stdout)  # printed where the user sees it
    print(f"job took {time.monotonic() - started:.0f}s")

    nodes = _nodes(cluster)
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    gpu_workers = {n["node_id"] for n in nodes if not n["is_head_node"] and n["resources_total"].get("GPU") == 1}
    assert len(head) == 1 and gpu_workers, nodes
    ledger = RunDir.open(str(runs[0])).ledger()
    assert {e.name for e in ledger.values()} == {"a", "b", "c", "d", "e", "f"}
    for entry in ledger.values():
        assert entry.state == "done", (entry.name, entry.state, entry.reason)
        node_id = (entry.info or {}).get("node_id")
        assert node_id in gpu_workers and node_id not in head, (entry.name, node_id, nodes)
        assert len((entry.info or {}).get("gpu_ids") or []) == 1, (entry.name, entry.info)

    # fetch it to "the laptop" and report there
    clock = time.monotonic()
    fetched = run([BIN / "bplab", "fetch", cluster["gcs"], f"bplab-runs/{runs[0].name}", cluster["laptop"] / "runs"],
                  env, 180, cwd=cluster["laptop"])
    assert fetched.returncode == 0, tail(fetched.stdout)
    local = cluster["laptop"] / "runs" / runs[0].name
    assert str(local) in fetched.stdout and (local / "manifest.json").is_file(), tail(fetched.stdout)
    assert sorted(p.relative_to(local) for p in local.rglob("*")) == \
        sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*"))
    print(f"fetch took {time.monotonic() - clock:.0f}s")
    clock = time.monotonic()
    report = run([BIN / "bplab", "report", local], env, 180, cwd=cluster["laptop"])
    assert report.returncode == 0, tail(report.stdout)
    print(f"report took {time.monotonic() - clock:.0f}s")
    digest = source_digest(ROOT)["source_sha256"]
    assert RunDir.open(str(local)).manifest()["source_sha256"] == digest
    assert digest[:16] in (local / "report" / "report.md").read_text()
