"""What the tests share, in one place (a test never imports another test file):

- `bplab(...)` / `start_bplab(...)`: the command in a subprocess, as a user runs it;
- `write_suite(...)`: a suite file (a copy of the built-in quick unless told otherwise);
- `ledger(run)`: the ledger entries of a run directory, by case name;
- `wait_for(...)`: poll a condition while a background `bplab` lives;
- `run_main(...)`, `assert_refused(...)`: `jobs.cli.main` in-process with `ray` stubbed out, and
  the shape of a refused input (one line, exit 2, Ray untouched);
- `copy_old_run(...)`: a run written by an earlier bplab (tests/fixtures/run-v1);
- `case_row(...)`, `tree_state(...)`, `make_existing_run(...)`, `write_run(...)`: run directories;
  `case_rows`, `train_reports`, `commit_report`: a run of real trainer reports, committed as the
  driver commits them; `train_case(...)`: a case trained in-process, optionally stopped as if killed;
- `local_cluster(...)`: a multi-node Ray cluster on this machine (ray.cluster_utils);
- `check_op(...)`: one layer's hand-written backward against tf.GradientTape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import yaml

from jobs.cli import main
from analysis.rundir import RunDir
from workers.settings import CaseSettings, DataSpec

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- bplab in a subprocess


def bplab_env(**extra) -> dict:
    """The environment bplab runs in: this checkout first on PYTHONPATH, TensorFlow's info
    lines off, no RAY_ADDRESS from the test session (a run starts its own Ray unless told)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def bplab(*args, cwd: Path = ROOT, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m jobs ARGS` to its end; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "jobs", *map(str, args)], cwd=cwd, env=env or bplab_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_bplab(*args, cwd: Path = ROOT, env: dict | None = None, log: Path | None = None,
                new_session: bool = False) -> subprocess.Popen:
    """`python -m jobs ARGS` in the background: stdout and stderr together, piped as text or
    written to `log`; `new_session` puts it in its own session (to stop what it leaves behind)."""
    out = open(log, "w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "jobs", *map(str, args)], cwd=cwd, env=env or bplab_env(),
                            stdout=out, stderr=subprocess.STDOUT, text=log is None, start_new_session=new_session)


def ledger(run: Path) -> dict:
    """Case name -> its ledger entry (a dict), skipping an entry caught half-written."""
    out = {}
    for path in (Path(run) / "ledger").glob("*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[entry["name"]] = entry
    return out


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, *,
             log: Path | None = None, every: float = 0.1):
    """predicate()'s first true value within `timeout` seconds; AssertionError naming `what`
    (and showing the end of the process's output) on time out or when `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = log.read_text() if log is not None else (process.stdout.read() if process.stdout else "")
            raise AssertionError(f"bplab exited ({process.returncode}) before {what}:\n{output[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------- suite files

# The defaults of the built-in `quick` suite (jobs/suites/quick.yaml), one epoch, two cases.
QUICK_DEFAULTS = {
    "model": "allconv9", "width": 0.25, "init": "xavier", "data": {"name": "digits"}, "optimizer": "adam",
    "lr": 0.002, "beta1": 0.9, "beta2": 0.9, "epsilon": 1.0e-8, "batch_size": 16, "epochs": 1, "seed": 678,
}
QUICK_CASES = {"a": {"schedule": "standard", "augment": False}, "b": {"schedule": "unfair-back", "augment": True}}


def write_suite(folder: Path, *, defaults: dict | None = None, cases: dict | None = None, extra: dict | None = None,
                text: str | None = None, name: str = "bad.yaml", base: dict | None = None) -> Path:
    """FOLDER/NAME, a suite named after the file: `defaults` over `base` (default: quick's,
    one epoch), `cases` (default: quick's a and b), `extra` top-level keys; or `text` as it is."""
    path = folder / name
    if text is None:
        document = {"name": Path(name).stem, "description": "a suite a test wrote",
                    "defaults": {**(QUICK_DEFAULTS if base is None else base), **(defaults or {})},
                    "cases": QUICK_CASES if cases is None else cases, **(extra or {})}
        text = yaml.safe_dump(document, sort_keys=False)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- the CLI in-process


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    ray_log: list[str]


class _RayStub(types.ModuleType):
    """Stands in for `ray` in-process: any use is logged and raises."""

    def __init__(self, log: list):
        super().__init__("ray")
        self.__dict__["_log"] = log

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._log.append(f"ray.{name}")
        raise RuntimeError(f"bad-input test guard: ray.{name} was used, so the input was not refused up front")


def run_main(args, cwd: Path, monkeypatch, capsys) -> Result:
    """jobs.cli.main(args) in this process, cwd = `cwd`, with `ray` stubbed out."""
    ray_log: list = []
    monkeypatch.setitem(sys.modules, "ray", _RayStub(ray_log))
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
        trace = ""
    except BaseException as error:  # noqa: BLE001 - shown as the subprocess would show it
        import traceback

        code = error.code if isinstance(error, SystemExit) else 1
        trace = "".join(traceback.format_exception(error))
    out, err = capsys.readouterr()
    return Result(code, out, err + trace, ray_log)


def assert_refused(result: Result, *names: str) -> str:
    """Exit 2, stderr exactly one 'bplab: error:' line naming every one of `names`, Ray never started."""
    shown = f"exit {result.code}\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout[-2000:]}"
    assert result.ray_log == [], f"Ray was used before the input was refused ({result.ray_log})\n{shown}"
    assert "Traceback" not in result.stderr, shown
    assert result.code == 2, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{shown}"
    line = lines[0]
    assert line.startswith("bplab: error: "), shown
    for name in names:
        assert name in line, f"the error does not name {name!r}: {line}"
    return line


# ---------------------------------------------------------------------- run directories


def case_row(case_id: str, name: str, settings: CaseSettings, *, group: str | None = None, steps_total: int = 8,
             num_gpus: float = 0.0) -> dict:
    """A cases-table row as `bplab run` writes it (jobs.plan.PlannedCase.row): ids, resources,
    the settings as JSON and one column per setting (status and report read them)."""
    return {"case_id": case_id, "name": name, "group": group or name, "num_cpus": 1.0, "num_gpus": num_gpus,
            "steps_total": steps_total, "settings_json": json.dumps(settings.to_dict(), default=list),
            **settings.flat()}


def tree_state(root: Path) -> dict:
    """Every file and folder under root: sha256 and mtime of files, just presence of folders."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = "dir"
        else:
            stat = path.stat()
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return state


def make_existing_run(location: Path) -> RunDir:
    """A run as `bplab run` leaves it: one case of the quick suite, two committed reports (metrics, checkpoint)."""
    settings = CaseSettings(model="allconv9", width=0.25, init="xavier", data=DataSpec("digits"), lr=0.002,
                            beta2=0.9, batch_size=16, epochs=1, seed=678)
    case_id = "a-0123456789"
    row = case_row(case_id, "a", settings, steps_total=90)
    run = RunDir.create(str(location), {"suite": "quick", "description": "an existing run", "suite_text": ""}, [row])
    rows = [{"split": "train", "epoch": 0, "step": step, "cost": 2.0 / step, "accuracy": 0.1 * step, "lr": 0.002}
            for step in (1, 2)]
    entry = dataclasses.replace(run.entry(case_id), state="running", attempts=1)
    entry = run.commit(case_id, entry, checkpoint=b"checkpoint bytes", tables={"metrics": rows})
    entry = dataclasses.replace(entry, step=3)
    run.commit(case_id, entry, checkpoint=b"later checkpoint", tables={"metrics": [dict(rows[-1], step=3)]})
    return run


def write_run(root: Path, cases: dict, suite: str = "lr-sweep", created: float = 1.7e9) -> Path:
    """A run directory as the driver leaves it, written without bplab (pyarrow directly).

    cases: name -> dict(settings=..., test=[acc per epoch], train=[[acc per step] per epoch],
    state="done", seed=1, group=name, updates=[per layer]).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    metrics_types = pa.schema([
        ("split", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()), ("cost", pa.float64()),
        ("accuracy", pa.float64()), ("lr", pa.float64()), ("examples", pa.int64()), ("wall_time", pa.float64()),
        ("updates", pa.string()), ("layers", pa.string()),
    ])
    root.mkdir(parents=True)
    (root / "ledger").mkdir()
    (root / "manifest.json").write_text(json.dumps({"suite": suite, "created_at": created}))
    rows = []
    for number, (name, spec) in enumerate(cases.items()):
        case_id = f"id{number:03d}"
        settings = {"model": "mlp", "lr": 0.001, "schedule": "standard", "augment": False, "data.name": "digits",
                    "data.classes": None, "epochs": len(spec["test"]), **spec.get("settings", {})}
        rows.append({"case_id": case_id, "name": name, "group": spec.get("group", name), "seed": spec.get("seed", 1),
                     "num_cpus": 1.0, "num_gpus": 0.0, "settings_json": "{}", **settings})
        state = spec.get("state", "done")
        (root / "ledger" / f"{case_id}.json").write_text(json.dumps({
            "case_id": case_id, "name": name, "state": state, "commit_seq": 1, "epoch": 0, "step": 0,
            "updated_at": created + 60 * (number + 1), "reason_class": None, "reason": None}))
        metric_rows, step = [], 0
        for epoch, accuracies in enumerate(spec["train"]):
            for accuracy in accuracies:
                metric_rows.append({"split": "train", "epoch": epoch, "step": step, "cost": 1 - accuracy,
                                    "accuracy": accuracy, "lr": settings["lr"], "examples": 10,
                                    "wall_time": created + step, "updates": json.dumps(spec.get("updates", [1, 1])),
                                    "layers": json.dumps(["l1", "l2"])})
                step += 1
            metric_rows.append({"split": "test", "epoch": epoch, "step": step, "cost": 1 - spec["test"][epoch],
                                "accuracy": spec["test"][epoch], "wall_time": created + step + 0.5})
        folder = root / "metrics" / f"case_id={case_id}"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(metric_rows, schema=metrics_types), folder / "part-000001.parquet")
        folder = root / "weights" / f"case_id={case_id}"
        folder.mkdir(parents=True)
        histograms = []
        for phase, (low, width, counts) in {"before": (-0.1, 0.05, [1, 3, 3, 1]),
                                            "after": (-0.4, 0.2, [2, 2, 2, 2])}.items():
            histograms += [{"phase": phase, "layer": layer, "param": "w", "bin": b, "left": low + width * b,
                            "right": low + width * (b + 1), "count": count}
                           for layer in ("l1", "l2") for b, count in enumerate(counts)]
        pq.write_table(pa.Table.from_pylist(histograms), folder / "part-before.parquet")
    pq.write_table(pa.Table.from_pylist(rows), root / "cases.parquet")
    return root


# Two cases of a learning-rate sweep, for write_run.
TWO_LR = {
    "slow": {"settings": {"lr": 0.001}, "test": [.3, .5], "train": [[.2, .3], [.4, .5]]},
    "fast": {"settings": {"lr": 0.002}, "test": [.6, .8], "train": [[.4, .6], [.7, .9]]},
}


OLD_RUN = ROOT / "tests" / "fixtures" / "run-v1"  # written by an earlier bplab (tests/fixtures/make_run_v1.py)


def copy_old_run(folder: Path) -> Path:
    """A copy of tests/fixtures/run-v1 in `folder`. Its dead driver's lease names a pid on the
    host that made it; on a host of that name the pid is what tells a live driver, and another
    process may hold that pid now, so the copy's lease names a pid known to be dead."""
    import platform
    import shutil

    copy = folder / "run-v1"
    shutil.copytree(OLD_RUN, copy)
    lock = copy / "driver.lock"
    record = json.loads(lock.read_text())
    if record.get("host") == platform.node():
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        lock.write_text(json.dumps({**record, "pid": child.pid}))
    return copy


# ---------------------------------------------------------------------- a run from real reports


# A tiny MLP on moons, 2 epochs of 3 steps, layer statistics every 2 steps (for train_reports).
SETTINGS = {"model": "mlp", "hidden": [8, 4], "data": {"name": "moons", "samples": 200}, "batch_size": 16,
            "epochs": 2, "steps_per_epoch": 3, "lr": 0.01, "layer_stats_every": 2, "alignment_every": 2, "seed": 3}


def case_rows(cases: dict) -> list[dict]:
    """cases.parquet rows as jobs.plan.PlannedCase.row() builds them; each case its own group
    (a group holds cases that differ by seed alone)."""
    from workers import settings as settings_module

    return [case_row(f"c{index}", name, settings_module.from_dict(values), group=name, steps_total=6)
            for index, (name, values) in enumerate(cases.items())]


def train_reports(values: dict) -> list:
    """The Reports workers.trainer.train hands its callback (one per epoch here)."""
    from workers import settings as settings_module
    from workers.data import load_dataset
    from workers.trainer import batch_plan, train

    settings = settings_module.from_dict(values)
    data = load_dataset(settings.data)
    reports = []
    _, steps_per_epoch = batch_plan(settings, len(data.x_train))  # one commit per epoch, not by time
    train(settings, data, reports.append, report_every_seconds=1e9, commit_every=1e9,
          checkpoint_every_steps=steps_per_epoch, max_chunk=1)
    return reports


def train_case(case, resume=None, stop_after_checkpoints=None, **kwargs) -> list:
    """The Reports workers.trainer.train hands its callback for `case` (a CaseSettings), in this
    process; `kwargs` go to train (cache, max_chunk, checkpoint_every_steps, ...). With
    `stop_after_checkpoints`, the training stops (as a kill would) once that many reports have
    carried a checkpoint. Commits come from `checkpoint_every_steps` and the end, not from the
    clock, unless `commit_every` is given: where a checkpoint falls must not depend on the load."""
    kwargs = {"commit_every": 1e9, "report_every_seconds": 1e9, **kwargs}
    from workers.data import load_dataset
    from workers.trainer import train

    reports = []

    def report(r):
        reports.append(r)
        if stop_after_checkpoints is not None and sum(x.checkpoint is not None for x in reports) >= stop_after_checkpoints:
            raise KeyboardInterrupt("simulated kill")

    try:
        train(case, load_dataset(case.data), report, resume=resume, **kwargs)
    except KeyboardInterrupt:
        pass
    return reports


def commit_report(run: RunDir, case_id: str, report) -> None:
    """What jobs.driver.Driver does with one report (histograms, then the commit)."""
    by_phase: dict = {}
    for row in report.histograms:
        by_phase.setdefault(row["phase"], []).append(row)
    for phase, rows in by_phase.items():
        run.write_histograms(case_id, phase, rows)
    entry = run.entry(case_id)
    entry.step = int(report.progress.get("step", entry.step))
    entry.epoch = int(report.progress.get("epoch", entry.epoch))
    entry.state = "done" if report.status == "done" else "running"
    run.commit(case_id, entry, checkpoint=report.checkpoint,
               tables={"metrics": report.rows, "layer_stats": report.layer_stats, "alignment": report.alignment})


# ---------------------------------------------------------------------- Ray on this machine


@contextlib.contextmanager
def local_cluster(nodes: int = 0, *, head_cpus: int = 1, cpus: int = 2, gpus: int = 0):
    """A Ray cluster of processes on this machine (ray.cluster_utils.Cluster): a head with
    `head_cpus` CPUs and no GPU, and `nodes` more nodes of `cpus` CPUs and `gpus` (declared)
    GPUs each. Yields the Cluster (its .address for `--address`)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus, num_gpus=gpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


# ---------------------------------------------------------------------- layers


TOL = 1e-6  # check_op's largest relative error


def rel_error(manual, reference) -> float:
    """max|manual - reference| over the larger of the two's largest magnitude."""
    import numpy as np

    manual, reference = np.asarray(manual), np.asarray(reference)
    assert manual.shape == reference.shape, (manual.shape, reference.shape)
    scale = max(np.abs(reference).max(), np.abs(manual).max(), 1e-12)
    return float(np.abs(manual - reference).max() / scale)


def check_op(op, x_shape, params=None, seed=0, ctx=None):
    """Manual d_x and d_params of `op` vs the tape's, for loss = sum(y * upstream)."""
    import numpy as np
    import tensorflow as tf

    from workers import layers as L

    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=x_shape) + 0.1, dtype=tf.float64)
    params = {k: tf.Variable(v, dtype=tf.float64) for k, v in (params or {}).items()}
    ctx = ctx or L.Context(training=True, seed=tf.constant([7, 3], tf.int64))
    y, cache = op.forward(x, params, ctx)
    upstream = tf.constant(rng.normal(size=y.shape), dtype=tf.float64)
    d_x, grads = op.backward(upstream, cache)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y_ref, _ = op.forward(x, params, ctx)
        objective = tf.reduce_sum(y_ref * upstream)
    names = sorted(params)
    ref = tape.gradient(objective, [x] + [params[n] for n in names])
    assert np.abs(ref[0].numpy()).max() > 0, "degenerate check: zero input gradient"
    assert rel_error(d_x, ref[0]) <= TOL, f"{op}: d_x"
    assert sorted(grads) == names
    for name, reference in zip(names, ref[1:]):
        assert rel_error(grads[name], reference) <= TOL, f"{op}: d_{name}"


# The quick suites tests/test_families.py runs whole through `python -m jobs run` -> the
# overrides that keep that run short (tests/test_suites_run.py does not run them again)
QUICK_SUITES = {
    "dni-quick": ["epochs=2"],
    "moons-quick": ["epochs=200"],
}
