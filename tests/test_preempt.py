"""A preempted GPU node on a cold autoscaling cluster (Ray's fake multi-node provider, as in
tests/test_autoscale.py, token auth on): a whole node (its raylet, agents and workers) is
SIGKILLed while two cases run on it, then the node the first case was retried on, the same way.

Every case finishes with one retry per node it lost (two in a row with `--max-retries 2`),
never placed back on a killed node, its rows exactly once and equal to the same case trained
in this process without Ray; its ledger entry lists each loss as `node_lost` with the node id
and the time, and `bplab status` names them.

The GCS's health check is shortened (a dead node is declared dead ~3 s after its raylet stops
answering, instead of ~15 s): the driver still sees the actors die before the GCS knows, which
is the race the driver must survive, and the test waits less for the GCS to settle.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from raycluster import BIN, autoscaling_head, kill_fake_node, run, tail

from tests.helpers import ledger, wait_for
from workers import settings as settings_module
from workers.data import load_dataset
from workers.trainer import train

# one `ray start --head` at a time when the suite runs in parallel (pytest -n 2): see pyproject.toml
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-start")]

ROOT = Path(__file__).resolve().parents[1]
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
MOONS = {"model": "mlp", "hidden": [8], "optimizer": "sgd", "lr": 2.0, "batch_size": 0, "seed": 7,
         "eval_every": 1000, "data": {"name": "moons", "samples": 200, "noise": 0.2}}
COLUMNS = ["split", "epoch", "step", "cost", "accuracy"]


@pytest.fixture(scope="module")
def cluster():
    # GPU nodes of 2 GPUs: both cases share a node, so one preemption hits them both
    with autoscaling_head({**HEALTH_CHECK, "PYTHONPATH": str(ROOT)}, gpus=2, cpus=2, max_workers=3) as info:
        yield info


def reference_rows(steps: int) -> pd.DataFrame:
    """The case trained here, without Ray, undisturbed."""
    rows = []
    train(settings_module.from_dict({**MOONS, "epochs": steps}), load_dataset(settings_module.from_dict(MOONS).data),
          lambda report: rows.extend(report.rows))
    return pd.DataFrame(rows).sort_values(["step", "split"])[COLUMNS].reset_index(drop=True)


def steps_for(seconds: float) -> int:
    """How many moons steps this process trains in about `seconds`."""
    case = settings_module.from_dict({**MOONS, "epochs": 3000})
    data = load_dataset(case.data)
    train(case, data, lambda report: None)  # traces
    started = time.perf_counter()
    train(case, data, lambda report: None)
    return max(10_000, int(3000 / (time.perf_counter() - started) * seconds) // 1000 * 1000)


def running_past(run_dir: Path, names, dead: set, seq: dict):
    """The entries when every case in `names` runs off the `dead` nodes with a commit beyond `seq`."""
    entries = ledger(run_dir)
    ok = all(name in entries and entries[name]["state"] == "running" and entries[name]["commit_seq"] > seq.get(name, 0)
             and entries[name]["info"].get("node_id") not in dead for name in names)
    return entries if ok else None


@pytest.mark.timeout(600)
def test_preempted_nodes_cost_each_case_one_retry(cluster, tmp_path):
    steps = steps_for(15.0)  # each case trains long enough for two preemptions (~15 s undisturbed here)
    suite = tmp_path / "preempt.yaml"
    suite.write_text(json.dumps({"name": "preempt", "defaults": {**MOONS, "epochs": steps},
                                 # b: an lr change far below float32 resolution, the same numbers as a
                                 "cases": {"a": {}, "b": {"lr": 2.0000000001}}}))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([BIN / "bplab", "run", suite, "--address", cluster["gcs"], "--out", run_dir,
                                "--commit-every", "1", "--max-retries", "2", "--progress-every", "0", "--no-report"],
                               env=cluster["env"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        first = wait_for(lambda: running_past(run_dir, "ab", set(), {}), 300, "both cases committed", process)
        node = first["a"]["info"]["node_id"]
        assert first["b"]["info"]["node_id"] == node, "one 2-GPU node was expected to take both cases"
        kills, killed = [time.time()], [node]
        assert kill_fake_node(node) >= 3, f"no processes found for node {node}"  # raylet, agents, workers
        # the second preemption: the node a was retried on, once both cases committed again
        seq = {name: entry["commit_seq"] for name, entry in first.items()}
        again = wait_for(lambda: running_past(run_dir, "ab", set(killed), seq), 300,
                         "both cases running and committed on another node", process)
        node = again["a"]["info"]["node_id"]
        kills.append(time.time())
        killed.append(node)
        assert kill_fake_node(node) >= 3, f"no processes found for node {node}"
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, tail(output)
    assert "before the case started" not in output, tail(output)  # no worker was placed on a dead node

    entries = ledger(run_dir)
    for name, entry in entries.items():
        assert entry["state"] == "done", (name, entry["state"], entry["reason"], tail(output))
        losses = entry["losses"]
        lost_on = [loss["node_id"] for loss in losses]
        assert all(loss["reason_class"] == "node_lost" and loss["settled"] and loss["counted"] for loss in losses), losses
        # settled when the GCS declared the node dead: at the loss itself if it already had, or later
        assert all(loss["settled_at"] >= loss["at"] and loss["resumed_at"] >= loss["at"] for loss in losses), losses
        assert entry["attempts"] == 1 + len(losses), (name, entry["attempts"], losses)  # one retry per loss
        assert set(lost_on) <= set(killed) and entry["info"]["node_id"] not in killed, (lost_on, killed)
        for loss, kill in zip(losses, kills):
            print(f"{name}: loss seen {loss['at'] - kill:.1f} s after the kill, running again after "
                  f"{loss['resumed_at'] - kill:.1f} s (the GCS settled it after {loss['settled_at'] - kill:.1f} s)")
    assert [loss["node_id"] for loss in entries["a"]["losses"]] == killed  # two in a row, --max-retries 2
    assert entries["a"]["attempts"] == 3

    expected = reference_rows(steps)
    metrics = pd.read_parquet(run_dir / "metrics")
    metrics["case_id"] = metrics["case_id"].astype(str)
    assert not metrics.duplicated(["case_id", "step", "split"]).any(), "a row was logged twice"
    for name, entry in entries.items():
        mine = metrics[metrics.case_id == entry["case_id"]].sort_values(["step", "split"])[COLUMNS].reset_index(drop=True)
        assert sorted(mine[mine.split == "train"]["step"]) == list(range(steps)), name
        pd.testing.assert_frame_equal(mine, expected, check_dtype=False)

    status = run([BIN / "bplab", "status", run_dir], cluster["env"], 120, cwd=tmp_path)
    assert status.returncode == 0, tail(status.stdout)
    for node in killed:
        assert f"a: node_lost: node {node[:12]}" in status.stdout, status.stdout
