"""Reused workers, kept traces, commits by time, many steps per call.

In-process (no Ray): cases run back to back with one StepCache give the rows of fresh
traces; a case resumed with another chunking is bit-identical; checkpoints are paced by
time; eval_every. On local Ray, through `bplab run`: one worker runs cases one after
another (same rows as a worker per case), a failed case does not poison the next one, and
a worker SIGKILLed during its second case is replaced and that case resumed exactly once.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import ledger, local_cluster, start_bplab, train_case, write_suite
from workers import settings as settings_module
from workers.steps import StepCache
from workers.trainer import unpack_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
VOLATILE = ("wall_time", "examples_per_sec")
MOONS = {"model": "mlp", "hidden": [8], "optimizer": "sgd", "lr": 2.0, "batch_size": 0, "epochs": 40,
         "data": {"name": "moons", "samples": 200, "noise": 0.2}}


def settings(**changes):
    return settings_module.from_dict({**MOONS, **changes})


def rows_of(reports):
    return [{k: v for k, v in row.items() if k not in VOLATILE} for r in reports for row in r.rows]


def last_checkpoint(reports):
    return [r.checkpoint for r in reports if r.checkpoint is not None][-1]


def assert_same_state(a: bytes, b: bytes):
    params_a, opt_a, meta_a, rule_a = unpack_checkpoint(a)
    params_b, opt_b, meta_b, rule_b = unpack_checkpoint(b)
    assert meta_a == meta_b
    for unit_a, unit_b in zip(params_a + rule_a, params_b + rule_b):
        assert unit_a.keys() == unit_b.keys()
        for name in unit_a:
            np.testing.assert_array_equal(unit_a[name], unit_b[name])
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        np.testing.assert_array_equal(opt_a[key], opt_b[key])


@pytest.mark.timeout(300)
def test_worker_imports_tensorflow_without_keras_and_tf_keras_still_loads():
    code = ("import sys; from workers.actor import import_tensorflow; tf = import_tensorflow(); "
            "assert 'keras' not in sys.modules and 'sklearn' not in sys.modules, 'Keras was imported'; "
            "assert sys.modules.get('keras.src.optimizers', 0) != None; "
            "print(float(tf.reduce_sum(tf.ones([3]))), tf.keras.layers.Dense.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3.0", "Dense"], done.stdout


def test_cases_back_to_back_in_one_worker_equal_fresh_traces():
    """Kept traces: same structure, other seed/lr/activation order; rows equal fresh runs'."""
    cases = [settings(seed=1, epochs=12), settings(seed=2, lr=0.5, epochs=9), settings(seed=1, activation="relu", epochs=7),
             settings(seed=3, optimizer="adam", lr=0.01, epochs=8), settings(seed=4, optimizer="adam", lr=0.02, epochs=8)]
    cache = StepCache()
    reused = [train_case(case, cache=cache) for case in cases]
    assert cache.misses == 3 and cache.hits == 2  # tanh-sgd, relu-sgd, tanh-adam traced once each
    for case, reports in zip(cases, reused):
        fresh = train_case(case)
        assert rows_of(reports) == rows_of(fresh)
        assert_same_state(last_checkpoint(reports), last_checkpoint(fresh))


@pytest.mark.timeout(300)
def test_an_augmented_case_runs_the_kept_steps_of_its_unaugmented_twin():
    """Augmentation is NumPy-side: the step sees a batch of the same shape either way, so the
    quick suite's a and b (or c and d, e and f) are one structure. The augmented case on the
    kept steps trains exactly as it does on steps traced for it alone."""
    digits = {"model": "allconv9", "width": 0.25, "init": "xavier", "optimizer": "adam", "lr": 0.001,
              "batch_size": 16, "epochs": 1, "steps_per_epoch": 4, "alignment_every": 2,
              "data": {"name": "digits", "train_size": 200, "test_size": 50}}
    plain, augmented = (settings_module.from_dict({**digits, "augment": flag}) for flag in (False, True))
    cache = StepCache()
    train_case(plain, cache=cache)
    kept = train_case(augmented, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    fresh = train_case(augmented)
    assert rows_of(kept) == rows_of(fresh)
    assert [r.alignment for r in kept] == [r.alignment for r in fresh]
    assert_same_state(last_checkpoint(kept), last_checkpoint(fresh))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("changes", [
    {"epochs": 30, "eval_every": 4},  # full batch, the test set evaluated inside the loop
    {"model": "dni_rnn", "hidden": [3], "schedule": "synthetic", "batch_size": 10, "epochs": 2,
     "data": {"name": "digits", "classes": [0, 1], "train_size": 80}},
    {"batch_size": 10, "epochs": 2, "optimizer": "adam", "lr": 0.01,  # 300 test examples: evaluated between calls
     "data": {"name": "digits", "train_size": 80, "test_size": 300}},
])
def test_resumed_fused_loop_case_is_bit_identical(changes):
    """Killed after its second commit, resumed with another number of steps per call."""
    case = settings(**changes)
    whole = train_case(case, max_chunk=2000, checkpoint_every_steps=5)
    part = train_case(case, max_chunk=2000, checkpoint_every_steps=5, stop_after_checkpoints=2)
    checkpoint = last_checkpoint(part)
    assert unpack_checkpoint(checkpoint)[2]["position"]["global_step"] == 10
    rest = train_case(case, resume=checkpoint, max_chunk=3, checkpoint_every_steps=7)
    assert_same_state(last_checkpoint(whole), last_checkpoint(rest))
    # the rows up to the commit point, then the resumed rows: exactly the uninterrupted rows
    assert rows_of(part) + rows_of(rest) == rows_of(whole)
    assert any(row["split"] == "test" for row in rows_of(rest))


@pytest.mark.timeout(300)
def test_eval_every_tests_every_nth_epoch_and_the_last():
    reports = train_case(settings(epochs=10, eval_every=4))
    tests = [row for row in rows_of(reports) if row["split"] == "test"]
    assert [row["epoch"] for row in tests] == [3, 7, 9]  # every 4th epoch and the last
    assert [row["step"] for row in tests] == [4, 8, 10]
    assert len([row for row in rows_of(reports) if row["split"] == "train"]) == 10
    assert settings(eval_every=2).digest() != settings().digest()
    with pytest.raises(settings_module.SettingsError, match="eval_every"):
        settings(eval_every=0)


@pytest.mark.timeout(300)
def test_commits_are_paced_by_time():
    case = settings(epochs=3000, layer_stats_every=0)
    started = time.monotonic()
    reports = train_case(case, commit_every=0.5, max_chunk=20)
    seconds = time.monotonic() - started
    checkpoints = sum(r.checkpoint is not None for r in reports)
    assert 2 <= checkpoints <= seconds / 0.5 + 2, (checkpoints, seconds)  # one per epoch would be 3,000
    assert len(rows_of(reports)) == 6000


# ---------------------------------------------------------------------- on local Ray

def moons_suite(tmp_path, name, cases: dict, **defaults) -> Path:
    """A suite of MOONS cases (`defaults` over MOONS)."""
    return write_suite(tmp_path, cases=cases, defaults=defaults, base=MOONS, name=f"{name}.yaml")


@pytest.fixture(scope="module")
def one_slot():
    """A Ray cluster with one CPU: one worker slot, so every case goes to the same worker."""
    with local_cluster(head_cpus=1) as cluster:
        yield cluster.address


def run_on(address, *args) -> subprocess.Popen:
    """`bplab run ARGS` on the cluster at `address`, one CPU a case, quiet, no report."""
    return start_bplab("run", *args, "--address", address, "--cpus-per-case", "1", "--progress-every", "0",
                       "--no-report")


def metrics(run_dir: Path) -> pd.DataFrame:
    table = pd.read_parquet(run_dir / "metrics")
    table["case_id"] = table["case_id"].astype(str)
    names = dict(pd.read_parquet(run_dir / "cases.parquet")[["case_id", "name"]].values)
    table["name"] = table["case_id"].map(names)
    assert not table.duplicated(["case_id", "step", "split"]).any(), "a row was logged twice"
    return table


def rows(table, name):
    columns = ["split", "epoch", "step", "cost", "accuracy"]
    return table[table.name == name].sort_values(["step", "split"])[columns].reset_index(drop=True)


def files_per_case(run_dir: Path) -> dict:
    return {folder.name: len(list(folder.glob("*.parquet"))) for folder in (run_dir / "metrics").iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_worker_runs_cases_in_turn_and_a_failure_does_not_poison(one_slot, tmp_path):
    cases = {"bad": {"augment": True},  # fails in the worker: augmentation needs images
             "g1": {"seed": 1}, "g2": {"seed": 2, "activation": "relu"}, "g3": {"seed": 3}}
    suite = moons_suite(tmp_path, "turns", cases, epochs=300)
    reused_dir, fresh_dir = tmp_path / "reused", tmp_path / "fresh"
    process = run_on(one_slot, str(suite), "--out", str(reused_dir))
    output, _ = process.communicate(timeout=800)
    assert process.returncode == 1, output[-3000:]  # the bad case failed, the others did not
    entries = ledger(reused_dir)
    assert entries["bad"]["state"] == "failed" and entries["bad"]["reason_class"] == "bug", entries["bad"]
    assert "augment" in entries["bad"]["reason"]
    assert all(entries[name]["state"] == "done" for name in ("g1", "g2", "g3")), output[-3000:]
    pids = {name: entries[name]["info"]["pid"] for name in cases}
    assert pids["g1"] != pids["bad"]  # a fresh worker after the failure
    assert pids["g1"] == pids["g2"] == pids["g3"]  # then one worker for the rest
    # g3 has g1's structure (tanh; g2 is relu): the worker takes it before g2 (jobs.driver.Driver._pick)
    assert [entries[name]["info"]["worker_cases"] for name in ("g1", "g3", "g2")] == [1, 2, 3]
    assert max(files_per_case(reused_dir).values()) <= 2  # commits by time: 300 steps, not 300 files

    fresh_suite = moons_suite(tmp_path, "fresh", {k: v for k, v in cases.items() if k != "bad"}, epochs=300)
    process = run_on(one_slot, str(fresh_suite), "--out", str(fresh_dir), "--fresh-worker-per-case")
    output, _ = process.communicate(timeout=800)
    assert process.returncode == 0, output[-3000:]
    fresh = ledger(fresh_dir)
    assert len({fresh[name]["info"]["pid"] for name in ("g1", "g2", "g3")}) == 3
    reused_rows, fresh_rows = metrics(reused_dir), metrics(fresh_dir)
    for name in ("g1", "g2", "g3"):
        assert len(rows(fresh_rows, name)) == 600
        pd.testing.assert_frame_equal(rows(reused_rows, name), rows(fresh_rows, name))


# The SIGKILL test's network: about a millisecond a step on the graph and with XLA alike, so that
# the seconds it needs are thousands of steps (rows), not the half million of the 8-unit MLP's
# XLA steps (whose rows, not their training, made that test take minutes)
HEAVY = {"hidden": [64, 64], "data": {"name": "moons", "samples": 1000, "noise": 0.2}}


def steps_in(seconds: float, compile: str = "graph", **changes) -> int:
    """How many moons steps (eval every 1,000) this machine trains in about `seconds`."""
    case = settings(seed=3, epochs=1000, eval_every=1000, compile=compile, **changes)
    cache = StepCache()
    train_case(case, cache=cache)  # traces (and compiles)
    started = time.perf_counter()
    train_case(case, cache=cache)
    rate = 1000 / (time.perf_counter() - started)
    return max(5_000, int(rate * seconds) // 1000 * 1000)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("compile", ["graph", "xla"])
def test_worker_killed_during_its_second_case(one_slot, tmp_path, compile):
    """Commits every 3 s; the kill lands 2.5 s after the victim's second commit. By then the
    trainer's 2-second progress report has brought rows to the driver that no commit holds yet:
    a driver that kept them for the retried attempt would log those steps twice. The victim
    learns by Kolen-Pollack, so its feedback weights B are part of what the retry restores, and
    it measures alignment every 1,000 steps (those rows, too, are logged once each and equal the
    control's). On the traced graph and on XLA, each asked for: the resumed attempt, in a fresh
    worker, compiles again and continues bit-identically."""
    steps = steps_in(24.0, compile, **HEAVY)  # the victim runs long enough for two commits and the kill (about 14 s here)
    rule = {"schedule": "kolen-pollack", "weight_decay": 1e-3, "alignment_every": 1000, "compile": compile}
    cases = {"first": {"seed": 1, "epochs": 50, "eval_every": 1}, "victim": {"seed": 7, **rule},
             "control": {"seed": 7, "lr": 2.0000000001, **rule}}
    suite = moons_suite(tmp_path, "kill2", cases, epochs=steps, eval_every=1000, **HEAVY)
    run_dir = tmp_path / "run"
    process = run_on(one_slot, str(suite), "--out", str(run_dir), "--commit-every", "3")
    deadline = time.monotonic() + 600
    victim = None
    while time.monotonic() < deadline and victim is None:
        entry = ledger(run_dir).get("victim")
        if entry and entry["state"] == "running" and entry["commit_seq"] >= 2:
            time.sleep(2.5)  # after the next progress report, before the next commit
            again = ledger(run_dir).get("victim")
            if again and again["state"] == "running" and again["commit_seq"] == entry["commit_seq"]:
                victim = again
                break
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    assert victim is not None, "the victim never ran 2.5 s past its second commit"
    assert victim["info"]["worker_cases"] == 2  # its worker's second case
    os.kill(victim["info"]["pid"], signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "worker_died" in output and f"retrying from commit {victim['commit_seq']} (step {victim['step']})" in output
    entries = ledger(run_dir)
    assert entries["victim"]["attempts"] == 2 and entries["victim"]["state"] == "done"
    assert entries["victim"]["info"]["pid"] != victim["info"]["pid"]
    assert entries["victim"]["info"]["trainer"]["compile"] == compile  # the ledger says how it ran
    table = metrics(run_dir)  # refuses a row logged twice
    assert sorted(table[(table.name == "victim") & (table.split == "train")]["step"]) == list(range(steps))
    control = rows(table, "control")
    mine = rows(table, "victim")
    # the control differs only by an lr change far below float32 resolution: the same numbers
    pd.testing.assert_frame_equal(mine, control)
    assert math.isclose(mine["accuracy"].iloc[-1], control["accuracy"].iloc[-1])
    # and the final weights, optimiser state and feedback weights, bit for bit
    from analysis.rundir import RunDir

    run = RunDir.open(run_dir)
    final = {name: unpack_checkpoint(run.load_checkpoint(entries[name]["case_id"])) for name in ("victim", "control")}
    (params, optimizer_state, _, feedback), (params_c, optimizer_c, _, feedback_c) = final["victim"], final["control"]
    assert feedback and all("w" in unit for unit in feedback)
    for mine_units, control_units in ((params, params_c), (feedback, feedback_c)):
        for unit, unit_c in zip(mine_units, control_units):
            assert unit.keys() == unit_c.keys()
            for name in unit:
                np.testing.assert_array_equal(unit[name], unit_c[name])
    assert optimizer_state.keys() == optimizer_c.keys()
    assert all(np.array_equal(optimizer_state[k], optimizer_c[k]) for k in optimizer_c)
    aligned = pd.read_parquet(run_dir / "alignment")
    aligned["name"] = aligned["case_id"].astype(str).map(dict(pd.read_parquet(run_dir / "cases.parquet")[["case_id", "name"]].values))
    assert not aligned.duplicated(["case_id", "step", "unit", "quantity"]).any(), "an alignment row was logged twice"
    columns = ["step", "unit", "quantity", "value"]

    def measured(name):
        rows = aligned[aligned.name == name][columns].astype({"quantity": str})
        return rows.sort_values(columns[:3]).reset_index(drop=True)

    assert sorted(set(measured("victim")["step"])) == list(range(0, steps, 1000))
    pd.testing.assert_frame_equal(measured("victim"), measured("control"))
    assert {"signal_angle", "error_angle", "feedback_angle", "feedback_ratio"} <= set(measured("victim")["quantity"])
