"""The runner on Ray: the CLI end to end on local Ray, and on a multi-node cluster on one
machine (ray.cluster_utils.Cluster, nodes declaring 2 GPUs each): six cases at once on
distinct node/GPU pairs; an actor SIGKILLed, a driver SIGKILLed, a node removed, each
ending with every case done and every (case, step, split) row present exactly once."""

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import bplab, ledger, local_cluster, start_bplab, wait_for, write_suite

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

DIGITS = {"model": "allconv9", "width": 0.25, "init": "xavier", "lr": 0.002, "batch_size": 16}


def digits_suite(tmp_path, name, cases: dict, epochs=2, train=640) -> Path:
    """A suite of small allconv9 cases on `train` digits."""
    return write_suite(tmp_path, cases=cases, base=DIGITS, name=f"{name}.yaml",
                       defaults={"epochs": epochs, "data": {"name": "digits", "train_size": train, "test_size": 200}})


def finish(process, timeout=600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def check_rows_exactly_once(run: Path, expect_cases: int):
    metrics = pd.read_parquet(run / "metrics")
    metrics["case_id"] = metrics["case_id"].astype(str)
    cases = pd.read_parquet(run / "cases.parquet")
    assert metrics["case_id"].nunique() == expect_cases
    assert not metrics.duplicated(["case_id", "step", "split"]).any(), "a row was logged twice"
    for row in cases.itertuples():
        mine = metrics[metrics["case_id"] == row.case_id]
        assert sorted(mine[mine.split == "train"]["step"]) == list(range(row.steps_total)), row.name
        settings = json.loads(row.settings_json)
        assert (mine.split == "test").sum() == settings["epochs"]
    return metrics, cases


def test_cli_quick_end_to_end(tmp_path):
    """The README's main job, as a user runs it (local Ray, embedded data)."""
    run = tmp_path / "quick"
    output = finish(start_bplab("run", "quick", "--out", str(run), "--progress-every", "0", cwd=tmp_path))
    states = {name: entry["state"] for name, entry in ledger(run).items()}
    assert states == {name: "done" for name in "abcdef"}, output[-3000:]
    metrics, cases = check_rows_exactly_once(run, 6)
    final = metrics[metrics.split == "test"].sort_values("step").groupby("case_id").tail(1)
    names = dict(zip(cases["case_id"].astype(str), cases["name"]))
    accuracy = {names[str(cid)]: acc for cid, acc in zip(final["case_id"], final["accuracy"])}
    # every schedule learns in 2 epochs (measured at lr 0.001: a .88, b .88, c .96, d .85, e .92, f .90)
    assert all(acc > 0.5 for acc in accuracy.values()), accuracy
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["suite"] == "quick" and manifest["data_fingerprints"]["digits"]
    status = bplab("status", run)
    assert status.returncode == 0 and status.stdout.count(" done ") == 6
    # the report `bplab run` wrote: every case, the same final accuracy as the raw Parquet, valid PNGs
    report = (run / "report" / "report.md").read_text()
    for name in "abcdef":
        assert f"| {name} |" in report
    table = pd.read_csv(run / "report" / "per_case.csv")
    raw = metrics[metrics.split == "test"].sort_values("step").groupby("case_id", observed=True).tail(1)
    raw_final = dict(zip(raw["case_id"].astype(str), raw["accuracy"]))
    assert len(table) == 6
    for row in table.itertuples():
        assert row.final_test_acc == raw_final[row.case_id]
    images = list((run / "report").glob("*.png"))
    assert len(images) >= 5
    import matplotlib.image

    for image in images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(image).ndim == 3


# ---------------------------------------------------------------------- multi-node


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(3, head_cpus=0, cpus=2, gpus=2) as cluster:
        yield cluster


def test_six_cases_at_once_on_distinct_gpus(cluster, tmp_path):
    suite = digits_suite(tmp_path, "six", {f"c{i}": {"seed": i} for i in range(6)}, epochs=4, train=1280)
    run = tmp_path / "run"
    process = start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                          "--cpus-per-case", "1", "--progress-every", "0", "--no-report")
    wait_for(lambda: len(ledger(run)) == 6 and all(e["state"] == "running" for e in ledger(run).values()),
             240, "all six cases running at the same time", process)
    finish(process)
    entries = ledger(run)
    pairs = {(e["info"]["node_id"], tuple(e["info"]["gpu_ids"])) for e in entries.values()}
    assert len(pairs) == 6, pairs  # six distinct node/GPU pairs
    assert len({node for node, _ in pairs}) == 3 and all(len(gpus) == 1 for _, gpus in pairs)
    assert all(e["info"]["cuda_visible_devices"] == e["info"]["gpu_ids"][0] for e in entries.values())
    # declared GPUs, CPU-only TensorFlow: allowed, but said (a CUDA build seeing no GPU is an error)
    assert all("CPU-only build" in e["info"]["warning"] for e in entries.values())
    check_rows_exactly_once(run, 6)


def test_actor_killed_mid_case_resumes_to_the_same_numbers(cluster, tmp_path):
    suite = digits_suite(tmp_path, "kill", {"victim": {}, "control": {}}, epochs=4, train=960)
    run = tmp_path / "run"
    process = start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                          "--checkpoint-every", "10", "--progress-every", "0", "--no-report")
    victim = wait_for(lambda: (lambda e: e if e and e["state"] == "running" and e["commit_seq"] >= 2 else None)(ledger(run).get("victim")),
                      240, "the victim's second commit", process)
    os.kill(victim["info"]["pid"], signal.SIGKILL)
    output = finish(process)
    entries = ledger(run)
    assert entries["victim"]["state"] == "done" and entries["victim"]["attempts"] == 2, output[-2000:]
    assert "worker_died" in output
    metrics, cases = check_rows_exactly_once(run, 2)
    ids = dict(zip(cases["name"], cases["case_id"]))
    columns = ["split", "epoch", "step", "cost", "accuracy"]

    def rows(name):
        return metrics[metrics.case_id == ids[name]].sort_values(["step", "split"])[columns].reset_index(drop=True)

    pd.testing.assert_frame_equal(rows("victim"), rows("control"))  # bit-identical to the uninterrupted run


def test_driver_killed_then_resume_runs_only_unfinished(cluster, tmp_path):
    suite = digits_suite(tmp_path, "driver", {"quick1": {"epochs": 1, "data": {"name": "digits", "train_size": 160}},
                                             "slow1": {"seed": 1}, "slow2": {"seed": 2}}, epochs=10, train=960)
    run = tmp_path / "run"
    process = start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                          "--checkpoint-every", "10", "--progress-every", "0", "--no-report")
    wait_for(lambda: (lambda l: l.get("quick1", {}).get("state") == "done" and l.get("slow1", {}).get("commit_seq", 0) >= 1)(ledger(run)),
             240, "one case done and another committed", process)
    second = bplab("run", "--resume", run, "--address", cluster.address, timeout=120)
    assert second.returncode == 2 and "is being run by pid" in second.stderr, second.stderr  # one driver per run
    process.kill()  # SIGKILL: no cleanup at all
    process.wait()
    before = ledger(run)
    assert before["quick1"]["state"] == "done" and before["slow1"]["state"] == "running"
    resumed = start_bplab("run", "--resume", str(run), "--address", cluster.address, "--progress-every", "0",
                          "--no-report")
    output = finish(resumed)
    after = ledger(run)
    unfinished = [name for name, entry in before.items() if entry["state"] != "done"]
    for name, entry in before.items():
        if entry["state"] == "done":
            assert after[name] == entry, f"the finished case {name} was touched"
        else:
            assert after[name]["attempts"] == entry["attempts"] + 1
    assert all(e["state"] == "done" for e in after.values())
    assert f"{len(unfinished)} to run" in output
    check_rows_exactly_once(run, 3)


def test_ctrl_c_stops_cleanly_and_the_run_resumes(cluster, tmp_path):
    suite = digits_suite(tmp_path, "interrupt", {"one": {}, "two": {"seed": 2}}, epochs=8, train=960)
    run = tmp_path / "run"
    process = start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                          "--checkpoint-every", "10", "--progress-every", "0", "--no-report")
    seen = []  # (seconds, {name: (state, commit_seq)}) at each change, shown if the test fails

    def both_running_and_one_committed():
        entries = ledger(run)
        now = {name: (e["state"], e["commit_seq"]) for name, e in entries.items()}
        if not seen or seen[-1][1] != now:
            seen.append((round(time.monotonic() - began, 1), now))
        # at the first commit of either case hundreds of steps are left: Ctrl-C finds both running
        return len(entries) == 2 and all(e["state"] == "running" for e in entries.values()) \
            and any(e["commit_seq"] >= 1 for e in entries.values())

    began = time.monotonic()
    wait_for(both_running_and_one_committed, 240, "both cases running, one committed", process)
    before = ledger(run)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    timeline = "\n".join(f"{t:6.1f} s {states}" for t, states in seen)
    assert process.returncode == 130, f"{output[-3000:]}\nledger before Ctrl-C:\n{timeline}"
    assert f"interrupted; continue with: bplab run --resume {run}" in output, output[-3000:]
    stopped = ledger(run)
    assert all(e["state"] == "pending" and e["reason_class"] == "interrupted" for e in stopped.values()), stopped
    assert all(stopped[name]["commit_seq"] >= entry["commit_seq"] for name, entry in before.items()), (before, stopped)
    output = finish(start_bplab("run", "--resume", str(run), "--address", cluster.address, "--progress-every", "0",
                                "--no-report"))
    assert all(e["state"] == "done" for e in ledger(run).values())
    check_rows_exactly_once(run, 2)


def test_resume_reruns_a_failed_case(cluster, tmp_path):
    from analysis.rundir import RunDir

    suite = digits_suite(tmp_path, "failed", {"ok": {}, "broken": {"seed": 3}}, epochs=1, train=320)
    run = tmp_path / "run"
    finish(start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                       "--progress-every", "0", "--no-report"))
    store = RunDir.open(str(run))
    broken = next(e for e in store.ledger().values() if e.name == "broken")
    done_before = next(e for e in store.ledger().values() if e.name == "ok")
    broken.state, broken.reason_class, broken.reason = "failed", "oom", "as if it had run out of memory"
    store.write_entry(broken)
    output = finish(start_bplab("run", "--resume", str(run), "--address", cluster.address, "--progress-every", "0",
                                "--no-report"))
    assert "1 to run" in output
    after = {e.name: e for e in RunDir.open(str(run)).ledger().values()}
    assert after["broken"].state == "done" and after["broken"].attempts == broken.attempts + 1
    assert after["ok"].attempts == done_before.attempts
    check_rows_exactly_once(run, 2)


def test_node_removed_mid_study(cluster, tmp_path):
    suite = digits_suite(tmp_path, "node", {f"n{i}": {"seed": i} for i in range(4)}, epochs=5, train=960)
    run = tmp_path / "run"
    process = start_bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--gpus-per-case", "1",
                          "--checkpoint-every", "10", "--progress-every", "0", "--no-report")
    target = wait_for(lambda: next((e for e in ledger(run).values() if e["state"] == "running" and e["commit_seq"] >= 1), None),
                      240, "a case with a commit", process)
    node = next(n for n in cluster.worker_nodes if n.node_id == target["info"]["node_id"])
    cluster.remove_node(node)
    output = finish(process)
    entries = ledger(run)
    assert all(e["state"] == "done" for e in entries.values()), output[-3000:]
    assert entries[target["name"]]["attempts"] >= 2
    assert "node_lost" in output
    check_rows_exactly_once(run, 4)
    cluster.add_node(num_cpus=2, num_gpus=2)  # leave the fixture as it was
