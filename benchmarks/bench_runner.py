"""Runner benchmark: what the driver and Ray scheduling cost, with tiny models so the
scheduling itself is measured (not TensorFlow's arithmetic).

    python benchmarks/bench_runner.py [--json PATH] [--reps N] [--epochs N] [--skip PART ...] [--keep]

Parts (the four numbers asked for, each with a reference measured in the same run):

1. ttfs      Time to first step: wall time from launching `python -m jobs run tiny.yaml --out DIR`
             (mlp hidden [16] on digits, 1 case, 20 steps, local Ray) to the `wall_time` of the
             first train row in the metrics Parquet, broken down from timestamps the driver
             harness records (see below) and the first row's own step time.
             Reference: `python -c "import tensorflow"` (the floor of an actor's start).
2. overhead  Driver overhead per case: the driver's own CPU time (getrusage of the driver
             process, all its threads; Ray's raylet/GCS/workers are other processes and are
             not counted), in total and inside Driver.execute, per case; the marginal driver
             CPU per extra case (slope between the 1-case and 6-case cluster runs); the wall
             time the driver loop spends in its own calls (launch, commit, ledger writes,
             finish) per case; and the requested wall formula (command wall - training span)
             for a case run alone.
3. parallel  ray.cluster_utils.Cluster: head (0 CPU, 0 GPU) + 3 nodes with num_cpus=2,
             num_gpus=2 (declared: no real GPU). Six cases with --gpus-per-case 1
             --cpus-per-case 1 against the cluster address, versus the same first case alone,
             and two cases. Efficiency = T(one alone) / T(six) on command wall time (launch to
             exit) and on the driver's execute makespan. This machine has 2 real cores shared
             by every "node", so a CPU-normalised figure is also printed (see the README).
4. commit    RunDir.commit rows/s with trainer-shaped metrics rows, 50 / 200 / 1000 rows per
             commit, with and without a ~1 MB allconv9 checkpoint (built with the project's own
             pack_checkpoint). Reference: the same rows through pandas.DataFrame.to_parquet,
             one file per batch (and the checkpoint bytes with a plain write), no rename, no
             fsync, no ledger. A diagnostic variant runs commit with fsync switched off.

The driver harness: each `bplab run` is launched as
`python benchmarks/bench_runner.py --harness EVENTS.json -- run ...`, which imports
jobs.cli, wraps a few functions with timers (load_data, connect = ray.init, RunDir.create /
commit / write_entry, Driver.execute / _launch / _handle / _finish, ray.put, ray.shutdown,
the report) and calls jobs.cli.main in-process, exactly as `python -m jobs` does. Nothing in
jobs/ or workers/ is modified; the wrappers add microseconds per call.

Local runs are started with RAY_ADDRESS=local: without it, `ray.init()` joins whatever cluster
/tmp/ray/ray_current_cluster names (any live `ray start` or cluster_utils.Cluster on the
machine). The cluster of part 3 is shut down with Cluster.shutdown() (never `ray stop`), and
the benchmark checks that no process of its Ray sessions is left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_pressure, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HARNESS_FLAG = "--harness"

TINY_SUITE = """\
name: tiny
description: one tiny case (mlp [16] on digits, 20 steps) to time the start of a run
defaults:
  model: mlp
  hidden: [16]
  lr: 0.01
  batch_size: 16
  epochs: 1
  data: {name: digits, train_size: 320, test_size: 200}
cases:
  t0: {seed: 0}
"""

PARALLEL_SUITE = """\
name: par
description: six tiny allconv9 cases (quarter width, digits) to time scheduling
defaults:
  model: allconv9
  width: 0.25
  init: xavier
  lr: 0.002
  batch_size: 16
  epochs: {epochs}
  data: {{name: digits, train_size: 1280, test_size: 200}}
cases:
{cases}
"""


# ====================================================================== the driver harness


def harness(events_path: str, argv: list[str]) -> int:
    """Run jobs.cli.main(argv) in this process with timers around the driver's calls."""
    t_proc = time.time()

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    events: dict = {"t_proc": t_proc, "cpu_proc": cpu(), "calls": []}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray

    import jobs.cli as cli
    import jobs.driver as driver
    import jobs.plan as plan
    import jobs.study as study
    from analysis.rundir import RunDir

    events["t_imported"], events["cpu_imported"] = time.time(), cpu()
    calls = events["calls"]

    def wrap(kind, function, extra=None, skip=None):
        def wrapper(*args, **kwargs):
            if skip is not None and skip(*args, **kwargs):
                return function(*args, **kwargs)
            record = {"kind": kind, "t0": time.time(), "cpu0": cpu(), "thread_cpu0": time.thread_time()}
            if extra is not None:
                try:
                    record.update(extra(*args, **kwargs))
                except Exception as error:  # never let the harness change the run
                    record["extra_error"] = repr(error)
            try:
                return function(*args, **kwargs)
            finally:
                record.update(t1=time.time(), cpu1=cpu(), thread_cpu1=time.thread_time())
                calls.append(record)
        return wrapper

    def commit_extra(self, case_id, entry, checkpoint=None, tables=None):
        rows = (tables or {}).get("metrics") or []
        walls = [r["wall_time"] for r in rows if isinstance(r, dict) and r.get("wall_time")]
        return {"case": case_id, "rows": len(rows or []), "ckpt_bytes": len(checkpoint) if checkpoint else 0,
                "last_row_wall": max(walls) if walls else None}

    plan.load_data = wrap("load_data", plan.load_data)
    original_connect = study.connect

    def connect(address):
        original_connect(address)
        try:
            events["session_dir"] = ray._private.worker._global_node.get_session_dir_path()
            events["raylet_pids"] = [pid for pid, cmd in scan_processes([events["session_dir"]]).items() if "raylet" in cmd]
        except Exception:
            events["session_dir"], events["raylet_pids"] = None, []

    study.connect = wrap("ray_init", connect)
    study.write_report = wrap("report", study.write_report)
    study.manifest = wrap("manifest", study.manifest)
    RunDir.create = wrap("create", RunDir.create)
    RunDir.commit = wrap("commit", RunDir.commit, commit_extra)
    RunDir.write_entry = wrap("write_entry", RunDir.write_entry,
                              lambda self, entry: {"case": entry.case_id, "state": entry.state})
    RunDir.write_histograms = wrap("write_histograms", RunDir.write_histograms)
    driver.Driver.execute = wrap("execute", driver.Driver.execute)
    driver.Driver._launch = wrap("launch", driver.Driver._launch, lambda self, state, *_: {"case": state.planned.case_id})
    driver.Driver._handle = wrap("handle", driver.Driver._handle,
                                 lambda self, state, ref, kind: {"case": state.planned.case_id, "what": kind})
    driver.Driver._finish = wrap("finish", driver.Driver._finish, lambda self, state, outcome: {"case": state.planned.case_id})
    ray.put = wrap("ray_put", ray.put)
    ray.shutdown = wrap("ray_shutdown", ray.shutdown)

    rc = None
    try:
        rc = cli.main(argv)
    finally:
        events.update(t_end=time.time(), cpu_end=cpu(), rc=rc, tf_in_driver="tensorflow" in sys.modules,
                      thread_cpu_end=time.thread_time())
        Path(events_path).write_text(json.dumps(events, default=str))
    return rc


# ====================================================================== machine








def load_note() -> dict:
    return {"uptime": uptime(), "cpu_pressure_avg10": cpu_pressure()}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cmdline(pid: str) -> str:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def scan_processes(session_dirs: list[str]) -> dict:
    """{pid: command line} of live processes whose command line names one of these Ray
    session folders (GCS, raylets, agents; not the workers, which rename themselves)."""
    names = [Path(d).name for d in session_dirs if d]
    found = {}
    if not names:
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmdline = _cmdline(entry.name)
            if any(name in cmdline for name in names):
                found[int(entry.name)] = cmdline
    return found


def leftover_processes(session_dirs: list[str], raylet_pids: list[int]) -> list[str]:
    """Processes of these sessions still alive: their system processes, and workers
    ('ray::...') whose RAY_RAYLET_PID is one of the sessions' raylets."""
    left = [f"{pid}: {cmd[:100]}" for pid, cmd in scan_processes(session_dirs).items()]
    wanted = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylet_pids}
    if wanted:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or not _cmdline(entry.name).startswith("ray::"):
                continue
            try:
                environ = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if environ & wanted:
                left.append(f"{entry.name}: {_cmdline(entry.name)[:100]}")
    return left


def process_cpu(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> set[int]:
    """Pids of every live process below `root` (children, their children, ...)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    below, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    return below


def machine_busy() -> float:
    """CPU-seconds the whole machine has been busy (all processes, all users), from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class ActorSampler(threading.Thread):
    """Samples the CPU time of each case's actor (pid from the ledger) until it exits."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir, self.cpu, self.done = run_dir, {}, threading.Event()

    def run(self):
        while not self.done.is_set():
            for path in list((self.run_dir / "ledger").glob("*.json")):
                try:
                    entry = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                pid = (entry.get("info") or {}).get("pid")
                if pid and _cmdline(str(pid)).startswith("ray::Worker"):
                    value = process_cpu(pid)
                    if value is not None:
                        self.cpu[(entry["case_id"], pid)] = value
            self.done.wait(0.2)


# ====================================================================== helpers


def env_for(local: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if local:
        env["RAY_ADDRESS"] = "local"  # a new local instance, never someone else's cluster
    return env


def say(text: str = "") -> None:
    print(text, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=2, unit=""):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def time_tf_import() -> tuple[float, float]:
    """(wall of `python -c "import tensorflow"`, the import statement alone inside it)."""
    env = env_for(local=True)
    code = "import time; t = time.perf_counter(); import tensorflow; print(time.perf_counter() - t)"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return time.perf_counter() - started, float(done.stdout.strip().splitlines()[-1])


def run_bplab(args: list[str], workdir: Path, tag: str, local: bool, timeout: float = 900,
              system_sessions: list[str] | None = None) -> dict:
    """Launch the driver (under the harness); return launch/exit times, events, the run's metrics."""
    events_path = workdir / f"{tag}.events.json"
    log_path = workdir / f"{tag}.log"
    command = [sys.executable, str(Path(__file__).resolve()), HARNESS_FLAG, str(events_path), "--", *args]
    before = load_note()
    out = Path(args[args.index("--out") + 1])
    if not out.is_absolute():
        out = workdir / out
    sampler = ActorSampler(out)
    # Ray's own processes of the cluster (GCS, raylets, agents, idle workers): all below this
    # benchmark process, apart from the driver we launch and the case actors (counted apart)
    system_before = {pid: process_cpu(pid) for pid in descendants(os.getpid())} if system_sessions else {}
    with open(log_path, "w") as log:
        busy_before = machine_busy()
        t_launch = time.time()
        process = subprocess.Popen(command, env=env_for(local), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        sampler.start()
        try:
            rc = process.wait(timeout=timeout)
        except BaseException:
            process.kill()  # only the driver we started (Ray cleans up its own workers)
            process.wait()
            raise
        finally:
            sampler.done.set()
            sampler.join()
        t_exit = time.time()
        busy = machine_busy() - busy_before
    actor_pids = {pid for _case, pid in sampler.cpu}
    system_after = ({pid: process_cpu(pid) for pid in descendants(os.getpid()) - actor_pids - {process.pid}}
                    if system_sessions else {})
    system_cpu = sum((system_after[p] or 0) - (system_before.get(p) or 0) for p in system_after)
    if rc != 0:
        raise RuntimeError(f"bplab {' '.join(args)} exited {rc}:\n" + log_path.read_text()[-3000:])
    events = json.loads(events_path.read_text())
    actor_cpu: dict = {}
    for (case_id, _pid), value in sampler.cpu.items():
        actor_cpu[case_id] = actor_cpu.get(case_id, 0.0) + value
    return {"tag": tag, "t_launch": t_launch, "t_exit": t_exit, "wall": t_exit - t_launch, "events": events,
            "run": out, "load_before": before, "load_after": load_note(), "actor_cpu": actor_cpu,
            "ray_system_cpu": system_cpu if system_sessions else None, "machine_busy_cpu": busy}


def case_timelines(run_dir: Path) -> dict:
    """Per case: first step start / end, last row, steps, from the metrics Parquet."""
    import pandas as pd

    metrics = pd.read_parquet(run_dir / "metrics")
    metrics["case_id"] = metrics["case_id"].astype(str)
    out = {}
    for case_id, rows in metrics.groupby("case_id"):
        train = rows[rows["split"] == "train"].sort_values("step")
        first = train.iloc[0]
        first_step_seconds = float(first["examples"]) / float(first["examples_per_sec"])
        steady = train.iloc[1:]
        out[case_id] = {
            "first_row_wall": float(first["wall_time"]),
            "first_step_seconds": first_step_seconds,
            "first_step_start": float(first["wall_time"]) - first_step_seconds,
            "last_row_wall": float(rows["wall_time"].max()),
            "train_steps": int(len(train)),
            "median_step_seconds": float((steady["examples"] / steady["examples_per_sec"]).median()) if len(steady) else None,
        }
        out[case_id]["training_span"] = out[case_id]["last_row_wall"] - out[case_id]["first_step_start"]
    return out


def ledger_info(run_dir: Path) -> dict:
    out = {}
    for path in (run_dir / "ledger").glob("*.json"):
        entry = json.loads(path.read_text())
        out[entry["case_id"]] = entry
    return out


def calls_of(events: dict, kind: str, **match) -> list[dict]:
    return [c for c in events["calls"] if c["kind"] == kind and all(c.get(k) == v for k, v in match.items())]


def analyse_run(result: dict) -> dict:
    """Numbers of one bplab run from its events, metrics and ledger."""
    events = result["events"]
    timelines = case_timelines(result["run"])
    ledger = ledger_info(result["run"])
    t_launch = result["t_launch"]
    execute = calls_of(events, "execute")[0]
    launches = calls_of(events, "launch")
    starts = {c["case"]: c for c in calls_of(events, "handle", what="start")}
    commits = calls_of(events, "commit")
    # wall time of the driver's own calls in its loop (launch, commit, ledger writes, finish),
    # without counting the write_entry calls made inside launch / finish twice
    outer = [c for c in events["calls"] if c["kind"] in ("launch", "finish", "commit", "write_histograms")]
    entries_outside = [c for c in calls_of(events, "write_entry")
                       if not any(o["t0"] <= c["t0"] and c["t1"] <= o["t1"] for o in outer)]
    driver_busy = sum(c["t1"] - c["t0"] for c in outer + entries_outside)
    latencies = [c["t0"] - c["last_row_wall"] for c in commits if c.get("last_row_wall")]
    n = len(timelines)
    first_rows = [t["first_row_wall"] for t in timelines.values()]
    out = {
        "cases": n,
        "wall": result["wall"],
        "execute_span": execute["t1"] - execute["t0"],
        "ttfs_first": min(first_rows) - t_launch,
        "ttfs_last": max(first_rows) - t_launch,
        "all_started_after_launch": (max(c["t1"] for c in starts.values()) - t_launch) if starts else None,
        "start_spread": (max(c["t0"] for c in starts.values()) - min(c["t0"] for c in starts.values())) if starts else None,
        "training_span_mean": statistics.mean(t["training_span"] for t in timelines.values()),
        "training_span_max": max(t["training_span"] for t in timelines.values()),
        "median_step_seconds": median([t["median_step_seconds"] for t in timelines.values()]),
        "last_row_to_exit": result["t_exit"] - max(t["last_row_wall"] for t in timelines.values()),
        "last_row_to_execute_end": execute["t1"] - max(t["last_row_wall"] for t in timelines.values()),
        "driver_cpu_total": events["cpu_end"],
        "driver_cpu_execute": execute["cpu1"] - execute["cpu0"],
        "driver_main_thread_cpu_execute": execute["thread_cpu1"] - execute["thread_cpu0"],
        "driver_cpu_before_execute": execute["cpu0"],
        "driver_busy_wall": driver_busy,
        "commits": len(commits),
        "commit_seconds_total": sum(c["t1"] - c["t0"] for c in commits),
        "commit_seconds_median": median([c["t1"] - c["t0"] for c in commits]),
        "commit_rows_median": median([c["rows"] for c in commits]),
        "commit_latency_median": median(latencies),
        "commit_latency_max": max(latencies) if latencies else None,
        "launch_seconds_total": sum(c["t1"] - c["t0"] for c in launches),
        "launch_loop_span": (max(c["t1"] for c in launches) - min(c["t0"] for c in launches)) if launches else None,
        "placement": sorted({(e.get("info", {}).get("node_id", "")[:8], tuple(e.get("info", {}).get("gpu_ids") or []))
                             for e in ledger.values()}),
        "states": sorted(e["state"] for e in ledger.values()),
        "tf_in_driver": events.get("tf_in_driver"),
        "actor_cpu_total": sum(result["actor_cpu"].values()),
        "actor_cpu_mean": statistics.mean(result["actor_cpu"].values()) if result["actor_cpu"] else None,
        "actors_sampled": len(result["actor_cpu"]),
        "ray_system_cpu": result["ray_system_cpu"],
        "machine_busy_cpu": result["machine_busy_cpu"],
        "session_dir": events.get("session_dir"),
        "load_before": result["load_before"],
        "load_after": result["load_after"],
    }
    return out


# ====================================================================== part 1 + 2 (local)


def part_ttfs(workdir: Path, reps: int) -> dict:
    say("\n== 1. time to first step (local Ray, 1 tiny case: mlp [16], digits, 20 steps) ==")
    suite = workdir / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    imports, runs, sessions, raylets = [], [], [], []
    imports.append(time_tf_import())
    for rep in range(reps):
        result = run_bplab(["run", str(suite), "--out", f"tiny-{rep}", "--progress-every", "0"], workdir,
                           f"tiny-{rep}", local=True)
        imports.append(time_tf_import())
        runs.append(result)
        sessions.append(result["events"].get("session_dir"))
        raylets.extend(result["events"].get("raylet_pids") or [])
    rows = []
    for result in runs:
        ev, t_launch = result["events"], result["t_launch"]
        timeline = next(iter(case_timelines(result["run"]).values()))
        ray_init = calls_of(ev, "ray_init")[0]
        load_data = calls_of(ev, "load_data")[0]
        create = calls_of(ev, "create")[0]
        manifest_call = calls_of(ev, "manifest")[0]
        launch = calls_of(ev, "launch")[0]
        start = calls_of(ev, "handle", what="start")[0]
        execute = calls_of(ev, "execute")[0]
        report = calls_of(ev, "report")
        shutdown = calls_of(ev, "ray_shutdown")
        commits = calls_of(ev, "commit")
        manifest = json.loads((result["run"] / "manifest.json").read_text())
        breakdown = {
            "python start + imports (jobs.cli, ray)": ev["t_imported"] - t_launch,
            "suite + data load (digits)": load_data["t1"] - ev["t_imported"],
            "ray.init (local Ray start)": ray_init["t1"] - ray_init["t0"],
            "plan (cluster nodes, case ids)": manifest_call["t0"] - ray_init["t1"],
            "manifest (git rev-parse + git status)": manifest_call["t1"] - manifest_call["t0"],
            "run dir (cases, ledger, manifest)": create["t1"] - manifest_call["t1"],
            "ray.put + driver set-up": launch["t0"] - create["t1"],
            "actor start (worker + TF import + set-up)": start["t0"] - launch["t0"],
            "train() set-up (model, histograms)": timeline["first_step_start"] - start["t0"],
            "first step (tf.function trace + run)": timeline["first_step_seconds"],
        }
        ttfs = timeline["first_row_wall"] - t_launch
        rows.append({
            "wall": result["wall"], "ttfs": ttfs, "breakdown": breakdown,
            "manifest_created_after_launch": manifest["created_at"] - t_launch,
            "first_commit_after_launch": (commits[0]["t1"] - t_launch) if commits else None,
            "last_row_to_execute_end": execute["t1"] - timeline["last_row_wall"],
            "ray_shutdown": sum(c["t1"] - c["t0"] for c in shutdown),
            "report": sum(c["t1"] - c["t0"] for c in report),
            "training_span": timeline["training_span"],
            "driver_cpu_total": ev["cpu_end"],
            "driver_cpu_before_execute": execute["cpu0"],
            "driver_cpu_execute": execute["cpu1"] - execute["cpu0"],
            "driver_cpu_report": sum(c["cpu1"] - c["cpu0"] for c in report),
            "tf_in_driver": ev.get("tf_in_driver"),
            "actor_cpu": sum(result["actor_cpu"].values()),
            "load": result["load_before"],
        })
    tf_import = median([wall for wall, _ in imports])
    tf_statement = median([inner for _, inner in imports])
    ttfs = median([r["ttfs"] for r in rows])
    say(f"  TF import reference: python -c 'import tensorflow' = {', '.join(fmt(w) for w, _ in imports)} s "
        f"(median {fmt(tf_import)} s; the import statement alone {fmt(tf_statement)} s)")
    for index, r in enumerate(rows):
        say(f"  run {index}: time to first step {fmt(r['ttfs'])} s = {fmt(r['ttfs'] / tf_import)} x TF import; "
            f"whole command {fmt(r['wall'])} s   [{r['load']['uptime']}]")
    say("  breakdown (median of runs; seconds):")
    keys = list(rows[0]["breakdown"])
    for key in keys:
        say(f"    {key:<44} {fmt(median([r['breakdown'][key] for r in rows])):>7}")
    say(f"    {'= time to first step':<44} {fmt(ttfs):>7}   ({fmt(ttfs / tf_import)} x TF import)")
    actor = median([r["breakdown"]["actor start (worker + TF import + set-up)"] for r in rows])
    say(f"  actor start / TF import: {fmt(actor / tf_import)} (/ the import statement alone: {fmt(actor / tf_statement)})")
    say(f"  manifest created_at after launch: {fmt(median([r['manifest_created_after_launch'] for r in rows]))} s; "
        f"first commit after launch: {fmt(median([r['first_commit_after_launch'] for r in rows]))} s")
    say(f"  after the last row: driver loop ends {fmt(median([r['last_row_to_execute_end'] for r in rows]))} s later, "
        f"ray.shutdown {fmt(median([r['ray_shutdown'] for r in rows]))} s, report {fmt(median([r['report'] for r in rows]))} s")
    return {"tf_import_seconds": imports, "tf_import_median": tf_import, "tf_import_statement_median": tf_statement,
            "ttfs_median": ttfs, "ttfs_over_tf_import": ttfs / tf_import,
            "actor_start_over_tf_import": actor / tf_import, "runs": rows, "sessions": sessions, "raylet_pids": raylets}


# ====================================================================== part 3 (+2) on a cluster


class RayAddressFile:
    """Keep /tmp/ray/ray_current_cluster as it was: Cluster() points it at itself (so any
    `ray.init()` on the machine would join our cluster) and Cluster.shutdown() deletes it."""

    def __init__(self):
        from ray._common.utils import get_ray_address_file

        self.path = Path(get_ray_address_file(None))
        self.saved = self.path.read_text() if self.path.exists() else None

    def restore(self, ours: str | None) -> None:
        try:
            current = self.path.read_text() if self.path.exists() else None
            if current is not None and (ours is None or current.strip() != ours.strip()):
                return  # someone else's cluster wrote it since: leave it
            if self.saved is None:
                if current is not None:
                    self.path.unlink()
            else:
                self.path.write_text(self.saved)
        except OSError:
            pass


def start_cluster():
    from ray.cluster_utils import Cluster

    guard = RayAddressFile()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    guard.restore(cluster.address)
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=2, num_gpus=2)
        cluster.wait_for_nodes()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster) -> None:
    guard = RayAddressFile()
    cluster.shutdown()  # removes its nodes' processes (never `ray stop`, which would hit other instances)
    guard.restore(None)  # shutdown deleted the file: put back what was there before
    time.sleep(1.0)


def part_parallel(workdir: Path, reps: int, epochs: int) -> dict:
    say(f"\n== 3. parallel efficiency (cluster_utils: head 0/0 + 3 nodes x 2 CPU, 2 declared GPUs; "
        f"allconv9 x0.25 on digits, {epochs} epochs of 80 steps) ==")
    cases = "\n".join(f"  c{i}: {{seed: {i}}}" for i in range(6))
    suite = workdir / "par.yaml"
    suite.write_text(PARALLEL_SUITE.format(epochs=epochs, cases=cases))
    t0 = time.time()
    cluster = start_cluster()
    cluster_start = time.time() - t0
    say(f"  cluster up in {fmt(cluster_start)} s at {cluster.address}")
    results: dict = {1: [], 2: [], 6: []}
    sessions = [cluster.head_node.get_session_dir_path()]
    raylets = [pid for pid, cmd in scan_processes(sessions).items() if "raylet" in cmd]
    try:
        for rep in range(reps):
            order = (1, 6, 2) if rep % 2 == 0 else (2, 6, 1)  # interleave: load drifts hit every size
            for n in order:
                only = ["--only", *[f"c{i}" for i in range(n)]] if n < 6 else []
                tag = f"par{n}-{rep}"
                result = run_bplab(["run", str(suite), "--address", cluster.address, "--out", tag, "--gpus-per-case", "1",
                                    "--cpus-per-case", "1", "--progress-every", "0", "--no-report", *only],
                                   workdir, tag, local=False, system_sessions=sessions)
                numbers = analyse_run(result)
                results[n].append(numbers)
                say(f"  {n} case(s), rep {rep}: command {fmt(numbers['wall'])} s, execute {fmt(numbers['execute_span'])} s, "
                    f"training span mean {fmt(numbers['training_span_mean'])} s, step {fmt(numbers['median_step_seconds'] * 1000, 1)} ms, "
                    f"all started {fmt(numbers['all_started_after_launch'])} s after launch, "
                    f"{len({p[0] for p in numbers['placement']})} node(s) / {len(numbers['placement'])} node-GPU pairs   "
                    f"[{numbers['load_before']['uptime']}]")
    finally:
        stop_cluster(cluster)
    return {"cluster_start_seconds": cluster_start, "runs": {str(k): v for k, v in results.items()}, "sessions": sessions,
            "raylet_pids": raylets}


def summarise_parallel(parallel: dict) -> dict:
    runs = {int(k): v for k, v in parallel["runs"].items()}

    def med(n, key):
        return median([r[key] for r in runs[n]])

    t1, t2, t6 = med(1, "wall"), med(2, "wall"), med(6, "wall")
    x1, x2, x6 = med(1, "execute_span"), med(2, "execute_span"), med(6, "execute_span")
    s1, s6 = med(1, "training_span_mean"), med(6, "training_span_mean")
    step1, step2, step6 = med(1, "median_step_seconds"), med(2, "median_step_seconds"), med(6, "median_step_seconds")
    out = {
        "T1_wall": t1, "T2_wall": t2, "T6_wall": t6,
        "T1_execute": x1, "T2_execute": x2, "T6_execute": x6,
        "efficiency6_raw_wall": t1 / t6, "efficiency6_raw_execute": x1 / x6,
        "efficiency2_raw_wall": t1 / t2, "efficiency2_raw_execute": x1 / x2,
        # 6 one-core cases on 2 cores: the best possible makespan is 3x a case alone
        "efficiency6_cpu_normalised_wall": 3 * t1 / t6, "efficiency6_cpu_normalised_execute": 3 * x1 / x6,
        "training_span_ratio_6_over_1": s6 / s1,
        "step_time_ratio_2_over_1": step2 / step1, "step_time_ratio_6_over_1": step6 / step1,
        "start_to_all_running_6": med(6, "all_started_after_launch"),
        "start_to_running_1": med(1, "all_started_after_launch"),
        "ttfs_1": med(1, "ttfs_first"), "ttfs_6_last": med(6, "ttfs_last"),
    }
    out["T1_non_training"] = x1 - s1
    out["T6_non_training"] = x6 - med(6, "training_span_max")
    # CPU accounting over each command's wall time (seconds of CPU; capacity = cores x wall)
    cores = os.cpu_count() or 2
    out["cpu"] = {}
    for n in sorted(runs):
        wall = med(n, "wall")
        out["cpu"][str(n)] = {
            "wall": wall, "capacity": cores * wall,
            "actors": med(n, "actor_cpu_total"), "actor_per_case": med(n, "actor_cpu_mean"),
            "driver": med(n, "driver_cpu_total"), "ray_system": med(n, "ray_system_cpu"),
            "machine_busy": med(n, "machine_busy_cpu"),
        }
        c = out["cpu"][str(n)]
        c["others"] = c["machine_busy"] - c["actors"] - c["driver"] - (c["ray_system"] or 0)
    # the CPU the six cases need (6 x one actor's CPU-seconds alone) over the CPU that was
    # available to the study during T6 (cores minus what other users of the machine took)
    c1, c6 = out["cpu"]["1"], out["cpu"]["6"]
    available = cores - c6["others"] / c6["wall"]
    out["available_cores_during_T6"] = available
    out["efficiency6_cpu_available"] = 6 * c1["actor_per_case"] / (available * c6["wall"])
    out["actor_cpu_ratio_6_over_1"] = c6["actor_per_case"] / c1["actor_per_case"]
    return out


def print_parallel(summary: dict) -> None:
    s = summary
    say("  medians over repetitions (seconds):")
    say(f"    {'':<28} {'1 case':>8} {'2 cases':>8} {'6 cases':>8}")
    say(f"    {'command wall (launch->exit)':<28} {fmt(s['T1_wall']):>8} {fmt(s['T2_wall']):>8} {fmt(s['T6_wall']):>8}")
    say(f"    {'driver execute makespan':<28} {fmt(s['T1_execute']):>8} {fmt(s['T2_execute']):>8} {fmt(s['T6_execute']):>8}")
    say(f"  parallel efficiency, 6 cases, raw T1/T6:         wall {fmt(s['efficiency6_raw_wall'])}   execute {fmt(s['efficiency6_raw_execute'])}   (goal >= 0.9)")
    say(f"  parallel efficiency, 2 cases, raw T1/T2:         wall {fmt(s['efficiency2_raw_wall'])}   execute {fmt(s['efficiency2_raw_execute'])}")
    say(f"  6 cases CPU-normalised 3*T1/T6 (2 real cores):   wall {fmt(s['efficiency6_cpu_normalised_wall'])}   execute {fmt(s['efficiency6_cpu_normalised_execute'])}")
    say(f"  6 cases, 6 x CPU of one case alone / (cores left by other users x T6): "
        f"{fmt(s['efficiency6_cpu_available'])} ({fmt(s['available_cores_during_T6'])} of 2 cores were left to the study)")
    say(f"  per-step time vs alone: 2 cases x{fmt(s['step_time_ratio_2_over_1'])}, 6 cases x{fmt(s['step_time_ratio_6_over_1'])} "
        f"(6 on 2 cores: x3 expected); training span 6/1 x{fmt(s['training_span_ratio_6_over_1'])}")
    say(f"  launch -> case running: 1 case {fmt(s['start_to_running_1'])} s; 6 cases, last one {fmt(s['start_to_all_running_6'])} s; "
        f"time to first step on the cluster: 1 case {fmt(s['ttfs_1'])} s, 6 cases (last) {fmt(s['ttfs_6_last'])} s")
    say(f"  actor CPU per case among six / alone: x{fmt(s['actor_cpu_ratio_6_over_1'])}")
    say("  CPU accounting over the command's wall time, in cores (CPU-seconds / wall), medians:")
    say(f"    {'cases':>5} {'actors':>7} {'per actor (CPU-s)':>18} {'driver':>7} {'Ray processes':>16} "
        f"{'machine busy':>13} {'other users':>12}")
    for n, c in s["cpu"].items():
        wall = c["wall"]
        say(f"    {n:>5} {c['actors'] / wall:>7.2f} {fmt(c['actor_per_case'], 1):>18} {c['driver'] / wall:>7.2f} "
            f"{(c['ray_system'] or 0) / wall:>16.2f} {c['machine_busy'] / wall:>13.2f} {c['others'] / wall:>12.2f}")


def print_overhead(ttfs: dict | None, parallel: dict | None) -> dict:
    say("\n== 2. driver overhead per case ==")
    out: dict = {}
    if ttfs:
        r = ttfs["runs"]
        out["local_1case"] = {
            "driver_cpu_total": median([x["driver_cpu_total"] for x in r]),
            "driver_cpu_before_execute": median([x["driver_cpu_before_execute"] for x in r]),
            "driver_cpu_execute": median([x["driver_cpu_execute"] for x in r]),
            "driver_cpu_report": median([x["driver_cpu_report"] for x in r]),
            "wall_minus_training": median([x["wall"] - x["training_span"] for x in r]),
            "wall_minus_training_without_report": median([x["wall"] - x["training_span"] - x["report"] for x in r]),
        }
        o = out["local_1case"]
        say(f"  local, 1 tiny case: driver CPU {fmt(o['driver_cpu_total'])} s in all "
            f"(start-up {fmt(o['driver_cpu_before_execute'])}, execute loop {fmt(o['driver_cpu_execute'])}, report {fmt(o['driver_cpu_report'])}); "
            f"TF imported by the driver: {r[0]['tf_in_driver']}")
        say(f"  wall overhead per case, (command wall - training span) / cases: {fmt(o['wall_minus_training'])} s "
            f"({fmt(o['wall_minus_training_without_report'])} s without the report)")
    if parallel:
        runs = {int(k): v for k, v in parallel["runs"].items()}
        per = {}
        for n, items in runs.items():
            per[n] = {
                "driver_cpu_execute": median([x["driver_cpu_execute"] for x in items]),
                "driver_main_thread_cpu_execute": median([x["driver_main_thread_cpu_execute"] for x in items]),
                "driver_cpu_total": median([x["driver_cpu_total"] for x in items]),
                "driver_busy_wall": median([x["driver_busy_wall"] for x in items]),
                "execute_span": median([x["execute_span"] for x in items]),
                "commits": median([x["commits"] for x in items]),
                "commit_seconds_median": median([x["commit_seconds_median"] for x in items]),
                "commit_latency_median": median([x["commit_latency_median"] for x in items]),
                "commit_latency_max": max(x["commit_latency_max"] or 0 for x in items),
                "launch_loop_span": median([x["launch_loop_span"] for x in items]),
                "wall_minus_training": median([x["wall"] - x["training_span_max"] for x in items]),
            }
        slope = (per[6]["driver_cpu_execute"] - per[1]["driver_cpu_execute"]) / 5
        out["cluster"] = {str(k): v for k, v in per.items()}
        out["marginal_driver_cpu_per_case"] = slope
        say("  cluster runs (medians):   cases | driver CPU: total / execute loop (main thread) | per case in loop | "
            "own-call wall in loop | commits, median commit | report->commit latency med/max")
        for n in sorted(per):
            p = per[n]
            say(f"    {n} | {fmt(p['driver_cpu_total'])} / {fmt(p['driver_cpu_execute'])} ({fmt(p['driver_main_thread_cpu_execute'])}) s "
                f"| {fmt(p['driver_cpu_execute'] / n)} s | {fmt(p['driver_busy_wall'] / n, 3)} s/case "
                f"| {p['commits']:.0f}, {fmt(p['commit_seconds_median'] * 1000, 1)} ms "
                f"| {fmt(p['commit_latency_median'] * 1000, 0)} / {fmt(p['commit_latency_max'] * 1000, 0)} ms")
        say(f"  marginal driver CPU per extra case (execute loop, (6 - 1 case) / 5): {fmt(slope, 3)} s "
            f"= {fmt(100 * slope / per[1]['execute_span'], 1)}% of one core over a {fmt(per[1]['execute_span'], 0)} s case")
        say(f"  (command wall - training span) for one case alone on the cluster: {fmt(per[1]['wall_minus_training'])} s")
    return out


# ====================================================================== part 4: commits


def trainer_rows(count: int, start_step: int, unit_names: list[str]) -> list[dict]:
    """Rows exactly as workers.trainer.train appends them (standard schedule: no extras)."""
    rows, now = [], time.time()
    for i in range(count):
        step = start_step + i
        rows.append({
            "split": "train", "epoch": step // 80, "step": step, "cost": 2.3 / (1 + step * 1e-3), "accuracy": (step % 16) / 16,
            "lr": 0.002, "stages": 1, "layer_updates": len(unit_names), "forward_passes": 1, "examples": 16,
            "examples_per_sec": 1200.0 + (step % 7), "wall_time": now + step * 0.013,
            "updates": json.dumps([1] * len(unit_names)), "layers": json.dumps(unit_names),
        })
    return rows


def realistic_checkpoint(workdir: Path) -> tuple[bytes, list[str]]:
    """pack_checkpoint of allconv9 (width 0.25, digits shape) with Adam state: ~1 MB."""
    import numpy as np

    from jobs import suites
    from workers import models
    from workers.trainer import pack_checkpoint

    path = workdir / "ckpt-suite.yaml"
    path.write_text(PARALLEL_SUITE.format(epochs=1, cases="  c0: {seed: 0}"))
    settings = suites.load_suite(str(path)).cases[0].settings
    model = models.build_model(settings, (8, 8, 1), 10)
    params = model.init_params(0)
    state = {}
    for i, unit in enumerate(params):
        state[f"t/{i}"] = np.asarray(80.0, np.float32)
        for name, value in unit.items():
            state[f"m/{i}/{name}"] = (value * 0.01).astype(np.float32)
            state[f"v/{i}/{name}"] = (value * value).astype(np.float32)
    blob = pack_checkpoint(params, state, {"epoch": 1, "step_in_epoch": 0, "global_step": 80}, settings)
    return blob, [unit.name for unit in model.units]


def part_commit(workdir: Path, rounds: int, rows_per_config: int) -> dict:
    import pandas as pd

    from analysis.rundir import RunDir

    say("\n== 4. rows per second the driver can commit (analysis.rundir.RunDir.commit) ==")
    blob, units = realistic_checkpoint(workdir)
    say(f"  checkpoint: allconv9 x0.25 params + Adam state via pack_checkpoint = {len(blob) / 1e6:.2f} MB; "
        f"rows: the trainer's train-row dict ({len(trainer_rows(1, 0, units)[0])} columns)")
    configs = [(b, c) for c in (False, True) for b in (50, 200, 1000)]
    location = workdir / "commit-run"
    case_rows = [{"case_id": f"k{b}-{'ck' if c else 'no'}-{v}", "name": f"k{b}-{'ck' if c else 'no'}-{v}"}
                 for b, c in configs for v in ("fsync", "nofsync")]
    run = RunDir.create(location, {"suite": "bench-commit", "created_at": time.time()}, case_rows)
    plain = RunDir.open(location)
    plain._files.durable = False  # diagnostic only: the same commit without the fsyncs
    entries = {row["case_id"]: run.entry(row["case_id"]) for row in case_rows}
    ref_dir = workdir / "commit-ref"
    ref_dir.mkdir(exist_ok=True)
    timings = {(b, c, v): [] for b, c in configs for v in ("commit", "nofsync", "pandas")}
    steps = {row["case_id"]: 0 for row in case_rows}
    ref_seq = 0
    for rnd in range(rounds):
        for batch, ckpt in configs:
            commits = max(2, rows_per_config // batch // rounds)
            variants = ["commit", "nofsync", "pandas"]
            if rnd % 2:
                variants.reverse()
            for variant in variants:
                for _ in range(commits):
                    if variant == "pandas":
                        rows = trainer_rows(batch, ref_seq * batch, units)
                        ref_seq += 1
                        t = time.perf_counter()
                        pd.DataFrame(rows).to_parquet(ref_dir / f"part-{ref_seq:06d}.parquet")
                        if ckpt:
                            (ref_dir / f"ckpt-{ref_seq:06d}.npz").write_bytes(blob)
                        timings[(batch, ckpt, variant)].append(time.perf_counter() - t)
                        continue
                    target = run if variant == "commit" else plain
                    case_id = f"k{batch}-{'ck' if ckpt else 'no'}-{'fsync' if variant == 'commit' else 'nofsync'}"
                    rows = trainer_rows(batch, steps[case_id], units)
                    steps[case_id] += batch
                    entry = entries[case_id]
                    entry.step = steps[case_id]
                    t = time.perf_counter()
                    entries[case_id] = target.commit(case_id, entry, checkpoint=blob if ckpt else None,
                                                     tables={"metrics": rows})
                    timings[(batch, ckpt, variant)].append(time.perf_counter() - t)
    fsyncs = {}
    real_fsync = os.fsync
    for batch, ckpt in configs:  # how many fsyncs one commit makes
        counter = []
        os.fsync = lambda fd, _c=counter: (_c.append(fd), real_fsync(fd))[1]
        try:
            case_id = f"k{batch}-{'ck' if ckpt else 'no'}-fsync"
            entry = entries[case_id]
            entries[case_id] = run.commit(case_id, entry, checkpoint=blob if ckpt else None,
                                          tables={"metrics": trainer_rows(batch, steps[case_id], units)})
            steps[case_id] += batch
        finally:
            os.fsync = real_fsync
        fsyncs[(batch, ckpt)] = len(counter)
    results = []
    say(f"  {'rows/commit':>11} {'ckpt':>5} | {'commit rows/s':>13} {'ms/commit':>9} | {'no-fsync rows/s':>15} {'ms':>7} "
        f"| {'pandas rows/s':>13} {'ms':>7} | commit/pandas")
    for batch, ckpt in configs:
        row = {"rows_per_commit": batch, "checkpoint_bytes": len(blob) if ckpt else 0}
        for variant in ("commit", "nofsync", "pandas"):
            values = timings[(batch, ckpt, variant)]
            per = statistics.median(values)
            row[variant] = {"commits": len(values), "median_seconds": per, "rows_per_second": batch / per,
                            "total_rows_per_second": batch * len(values) / sum(values)}
        row["ratio_commit_over_pandas"] = row["commit"]["rows_per_second"] / row["pandas"]["rows_per_second"]
        row["fsyncs_per_commit"] = fsyncs[(batch, ckpt)]
        results.append(row)
        say(f"  {batch:>11} {('1 MB' if ckpt else '-'):>5} | {row['commit']['rows_per_second']:>13,.0f} "
            f"{row['commit']['median_seconds'] * 1000:>9.1f} | {row['nofsync']['rows_per_second']:>15,.0f} "
            f"{row['nofsync']['median_seconds'] * 1000:>7.1f} | {row['pandas']['rows_per_second']:>13,.0f} "
            f"{row['pandas']['median_seconds'] * 1000:>7.1f} | {row['ratio_commit_over_pandas']:.2f}   ({row['fsyncs_per_commit']} fsyncs)")
    # the single ledger write (what every state change costs)
    entry = run.entry(case_rows[0]["case_id"])
    ledger_times = []
    for _ in range(20):
        t = time.perf_counter()
        entry = run.write_entry(entry)
        ledger_times.append(time.perf_counter() - t)
    ledger_ms = statistics.median(ledger_times) * 1000
    fsync_times = []
    probe = workdir / "fsync-probe"
    for _ in range(20):
        with open(probe, "wb") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            t = time.perf_counter()
            os.fsync(handle.fileno())
            fsync_times.append(time.perf_counter() - t)
    fsync_ms = statistics.median(fsync_times) * 1000
    say(f"  one ledger write (write_entry, 2 fsyncs): {ledger_ms:.2f} ms; one fsync of a 4 KB file here: {fsync_ms:.2f} ms")
    return {"configs": results, "ledger_write_ms": ledger_ms, "fsync_4k_ms": fsync_ms, "checkpoint_bytes": len(blob),
            "rounds": rounds, "load": load_note()}


# ====================================================================== main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each bplab run (default 2)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs (80 steps each) of the parallel cases (default 12)")
    parser.add_argument("--commit-rounds", type=int, default=3)
    parser.add_argument("--commit-rows", type=int, default=3000, help="rows per commit configuration and variant")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ttfs", "parallel", "commit"])
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (run dirs, logs, events)")
    args = parser.parse_args(argv)

    import ray

    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="bplab-bench-runner-"))
    say(f"bench_runner  {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
        f"{os.cpu_count()} cores ({cpu_model()})  python {platform.python_version()}  ray {ray.__version__}")
    say(f"load at start: {uptime()}  cpu pressure avg10 {cpu_pressure()}   scratch: {workdir}")
    out: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                 "cores": os.cpu_count(), "cpu_model": cpu_model(), "ray": ray.__version__,
                 "python": platform.python_version(), "load_start": load_note(), "args": vars(args)}
    sessions: list = []
    raylets: list = []
    try:
        if "ttfs" not in args.skip:
            out["ttfs"] = part_ttfs(workdir, args.reps)
            sessions += out["ttfs"]["sessions"]
            raylets += out["ttfs"]["raylet_pids"]
        if "parallel" not in args.skip:
            out["parallel"] = part_parallel(workdir, args.reps, args.epochs)
            sessions += out["parallel"]["sessions"]
            raylets += out["parallel"]["raylet_pids"]
            out["parallel_summary"] = summarise_parallel(out["parallel"])
            print_parallel(out["parallel_summary"])
        out["overhead"] = print_overhead(out.get("ttfs"), out.get("parallel"))
        if "commit" not in args.skip:
            out["commit"] = part_commit(workdir, args.commit_rounds, args.commit_rows)
    finally:
        left = leftover_processes(sessions, raylets)
        out["leftover_ray_processes"] = left
        say(f"\nRay processes left from this benchmark's sessions: {len(left)}" + ("".join("\n  " + x for x in left)))
        out["load_end"] = load_note()
        out["total_seconds"] = time.time() - started
        say(f"load at end: {out['load_end']['uptime']}   total {out['total_seconds']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))
            say(f"results: {args.json}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == HARNESS_FLAG:
        rest = sys.argv[3:]
        sys.exit(harness(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(main())
