"""The `bplab` command (also `python -m jobs`).

Exit codes: 0 every case done (or diverged: a result, not a failure), 1 some case
failed, 2 bad input (shown as one line, before anything is launched), 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """Bad command-line input (one line)."""


def _user_errors() -> tuple:
    from jobs.plan import PlanError
    from jobs.storage import StorageError
    from jobs.suites import SuiteError
    from workers.data import DataError
    from workers.settings import SettingsError

    return (UsageError, SuiteError, SettingsError, PlanError, StorageError, DataError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bplab", description="Distributed batch runner for studies of hand-written back propagation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def resources(p):
        p.add_argument("--gpus-per-case", type=float, default=None, help="GPUs per case (default: 1 if the cluster has GPUs, else 0)")
        p.add_argument("--cpus-per-case", type=float, default=1.0, help="CPUs per case (TensorFlow's thread pools are sized to it)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of every case, e.g. --set epochs=3 --set data.path=~/data")
        p.add_argument("--only", nargs="+", default=[], metavar="CASE", help="run only these cases (names or groups)")

    run = sub.add_parser("run", help="run a suite (or resume a run)")
    run.add_argument("suite", nargs="?", help="built-in suite name or a YAML file (optional with --resume)")
    run.add_argument("--address", default=None, help="Ray address ('auto' inside a cluster); default: start local Ray")
    run.add_argument("--out", default=None, help="run directory: a path or a pyarrow.fs URI (default runs/SUITE-TIME)")
    run.add_argument("--resume", default=None, metavar="RUN", help="continue this run: whatever is not done, plus new cases")
    run.add_argument("--max-retries", type=int, default=2, help="retries per case after a lost worker or node")
    run.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS", help="commit every N steps as well as every epoch (0: epochs only)")
    run.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS", help="print the progress table this often (0: never)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    resources(run)

    plan = sub.add_parser("plan", help="expand a suite: cases, ids, resources, estimated steps")
    plan.add_argument("suite")
    plan.add_argument("--address", default=None, help="check against this Ray cluster (default: cluster.yaml's node types)")
    resources(plan)

    status = sub.add_parser("status", help="the state of every case of a run (reads the ledger; no driver needed)")
    status.add_argument("run")

    report = sub.add_parser("report", help="write report.md, tables (CSV) and figures (PNG) of a run")
    report.add_argument("run")
    report.add_argument("--baseline", default=None, help="case or group to compare every other one with")
    report.add_argument("--out", default=None, help="output folder (default RUN/report)")

    grad = sub.add_parser("gradcheck", help="hand-written gradients vs tf.GradientTape, per layer")
    grad.add_argument("model", nargs="?", default="all")
    grad.add_argument("--tolerance", type=float, default=1e-6)

    board = sub.add_parser("tensorboard", help="export runs as TensorBoard event files (RUN/tensorboard/) and serve them")
    board.add_argument("runs", nargs="+", metavar="RUN", help="run directories; a live run's new commits are appended")
    board.add_argument("--no-serve", action="store_true", help="export only, do not start TensorBoard")
    board.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: the first free one from 6006)")

    cases = sub.add_parser("cases", help="list built-in suites, or the cases of one")
    cases.add_argument("suite", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    user_errors = _user_errors()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except user_errors as error:
        print(f"bplab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bplab: interrupted", file=sys.stderr)
        return 130


def _one_line(error) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ---------------------------------------------------------------------- commands


def cmd_cases(args) -> int:
    from jobs import suites

    if not args.suite:
        for name in suites.builtin_names():
            suite = suites.load_suite(name)
            print(f"{name:<20} {len(suite.cases):>3} cases  {suite.description[:90]}")
        return 0
    suite = suites.load_suite(args.suite)
    default = suite.cases[0].settings.flat()
    varying = [k for k in default if any(c.settings.flat()[k] != default[k] for c in suite.cases)]
    print(f"{suite.name}: {suite.description}")
    for case in suite.cases:
        flat = case.settings.flat()
        print(f"  {case.name:<24} " + "  ".join(f"{k}={flat[k]}" for k in varying))
    print("shared: " + "  ".join(f"{k}={v}" for k, v in default.items() if k not in varying and v not in (None, "", "[]")))
    return 0


def _load(args):
    from jobs import plan as plan_module, suites

    suite = suites.select(suites.load_suite(args.suite, args.overrides), args.only)
    datasets = plan_module.load_data(suite.cases)
    return suite, datasets


def cmd_plan(args) -> int:
    from jobs import plan as plan_module

    suite, datasets = _load(args)
    if args.address:
        _connect(args.address)
        nodes, where = plan_module.ray_nodes(), f"the Ray cluster at {args.address}"
    else:
        nodes, where = plan_module.cluster_yaml_nodes(), "cluster.yaml"
    gpus = args.gpus_per_case if args.gpus_per_case is not None else (1.0 if any(n["GPU"] for n in nodes) else 0.0)
    planned = plan_module.make_plan(suite, datasets, cpus_per_case=args.cpus_per_case, gpus_per_case=gpus)
    plan_module.check_fits(planned, nodes, where)
    print(plan_module.format_plan(planned, nodes, where))
    for spec, data in datasets.items():
        print(f"data {spec.name}: train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}, fingerprint {data.fingerprint[:16]}")
    return 0


def _case_from_row(row: dict):
    """A suite Case from a row of a run's cases table (its settings are stored as JSON)."""
    from jobs.suites import Case
    from workers import settings as settings_module

    settings = settings_module.from_json(json.loads(row["settings_json"]))
    return Case(row["name"], row.get("group") or row["name"], settings)


def _suite_from_run(run, only, overrides):
    """The cases of an existing run (for --resume without a suite)."""
    from jobs import suites

    if overrides:
        raise suites.SuiteError("--set needs a suite: a resumed run keeps the settings it was started with")
    manifest = run.manifest()
    cases = tuple(_case_from_row(row) for row in run.cases().to_dict("records"))
    suite = suites.Suite(manifest.get("suite", "resumed"), manifest.get("description", ""), manifest.get("reference"),
                         cases, manifest.get("suite_source", ""), manifest.get("suite_text", ""))
    return suites.select(suite, only)


def cmd_run(args) -> int:
    from jobs import plan as plan_module
    from jobs.storage import RunDir, StorageError

    if args.max_retries < 0:
        raise UsageError(f"--max-retries {args.max_retries}: must be >= 0")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0")
    run = None
    if args.resume:
        run = RunDir.open(args.resume)
        if args.out:
            raise UsageError("--out and --resume: the resumed run is written where it is")
    if args.suite:
        from jobs import suites

        suite = suites.select(suites.load_suite(args.suite, args.overrides), args.only)
    elif run is not None:
        suite = _suite_from_run(run, args.only, args.overrides)
    else:
        raise UsageError("run: give a SUITE (see `bplab cases`) or --resume RUN")
    datasets = plan_module.load_data(suite.cases)
    # impossible requests fail before Ray starts; the GPU default is set once the cluster is known
    planned = plan_module.make_plan(suite, datasets, cpus_per_case=args.cpus_per_case, gpus_per_case=args.gpus_per_case or 0.0)
    location = args.out or str(Path("runs") / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run is None:
        probe = RunDir(location)
        if probe.is_run():
            raise StorageError(f"{location} already holds a run: resume it with --resume {location}")

    import ray

    _connect(args.address)
    try:
        nodes = plan_module.ray_nodes()
        where = f"the Ray cluster ({args.address or 'local'})"
        gpus = args.gpus_per_case if args.gpus_per_case is not None else (1.0 if any(n["GPU"] for n in nodes) else 0.0)
        for case in planned:
            case.num_gpus = gpus
        plan_module.check_fits(planned, nodes, where)
        fingerprints = {spec.name: data.fingerprint for spec, data in datasets.items()}
        if run is None:
            run = RunDir.create(location, _manifest(suite, fingerprints, args), [p.row() for p in planned])
            _take_lease(run)
        else:
            _take_lease(run)  # before recover(): never repair a run another driver is writing
            for note in run.recover():
                print(f"[bplab] recover: {note}", file=sys.stderr)
            known = set(run.case_ids())
            added = run.add_cases([p.row() for p in planned if p.case_id not in known])
            if added:
                print(f"[bplab] {len(added)} new case(s) added to {run.location}", file=sys.stderr)
        from jobs.driver import TERMINAL, Driver

        ledger = run.ledger()
        todo = [p for p in planned if ledger[p.case_id].state not in TERMINAL]
        print(f"[bplab] run {run.location}: {len(planned)} cases, {len(todo)} to run, "
              f"{plan_module.parallel_slots(planned, nodes)} at once ({gpus:g} GPU, {args.cpus_per_case:g} CPU each)",
              file=sys.stderr, flush=True)
        states = {cid: entry.state for cid, entry in ledger.items() if cid in {p.case_id for p in planned}}
        if todo:
            refs = {spec: ray.put(datasets[spec]) for spec in {p.data_key for p in todo}}  # once per data set
            driver = Driver(run, todo, refs, max_retries=args.max_retries, checkpoint_every_steps=args.checkpoint_every,
                            progress_every=args.progress_every, lease=lambda: _refresh_lease(run))
            states.update(driver.execute())
    finally:
        if run is not None and (run.read_lock() or {}).get("token") == _LEASE_TOKEN:
            run.remove_lock()
        ray.shutdown()
    if not args.no_report:
        _write_report(run)
    counts = Counter(states.values())
    print(f"[bplab] {run.location}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)
    return 1 if counts["failed"] else 0


LEASE_STALE_SECONDS = 60.0
_LEASE_TOKEN = f"{platform.node()}:{os.getpid()}:{time.time()}"


def _lease() -> dict:
    return {"host": platform.node(), "pid": os.getpid(), "token": _LEASE_TOKEN, "heartbeat": time.time()}


def _take_lease(run) -> None:
    """Refuse a run another live driver holds (fresh heartbeat, or a live pid on this host)."""
    from jobs.storage import StorageError

    holder = run.read_lock()
    if holder and holder.get("token") != _LEASE_TOKEN:
        age = time.time() - float(holder.get("heartbeat", 0))
        same_host = holder.get("host") == platform.node()
        alive = same_host and _pid_alive(int(holder.get("pid", -1)))
        if alive or (not same_host and age < LEASE_STALE_SECONDS):
            raise StorageError(f"{run.location} is being run by pid {holder.get('pid')} on {holder.get('host')} "
                               f"(heartbeat {age:.0f} s ago); wait for it, or remove {run.location}/driver.lock if it is dead")
    run.write_lock(_lease())


def _refresh_lease(run) -> None:
    try:
        run.write_lock(_lease())
    except Exception as error:  # a missed heartbeat is not worth stopping the study
        print(f"[bplab] could not refresh driver.lock: {_one_line(error)}", file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_report(run) -> None:
    try:
        from analysis.report import write_report

        location = str(run.location)
        out_dir = None
        if "://" in location and not location.startswith("file://"):  # remote run: the report goes to a local folder
            out_dir = Path("reports") / location.rstrip("/").rsplit("/", 1)[-1]
        path = write_report(location, out_dir=out_dir)
        print(f"[bplab] report: {path}", file=sys.stderr)
    except Exception as error:  # a report problem never loses the run's results
        print(f"[bplab] report not written: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)


def _connect(address: str | None) -> None:
    import ray

    try:
        if address:
            ray.init(address=address, logging_level="ERROR")
        else:
            # "local": a new Ray of our own, never a cluster some other process started on this machine
            ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"cannot connect to Ray at {address or 'a new local cluster'}: {_one_line(error)}") from None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None}


def _manifest(suite, fingerprints: dict, args) -> dict:
    import numpy
    import ray

    cluster_yaml = ROOT / "cluster.yaml"
    return {
        "suite": suite.name,
        "description": suite.description,
        "reference": suite.reference,
        "suite_source": suite.source,
        "suite_text": suite.text,
        "overrides": list(getattr(args, "overrides", [])),
        "bplab_version": _version("bplab") or "0.1.0",
        **_git(),
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "numpy": numpy.__version__,
                     "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
                     "pandas": _version("pandas"), "pyarrow": _version("pyarrow"), "imgaug": _version("imgaug")},
        "data_fingerprints": fingerprints,
        "cluster_yaml_sha256": hashlib.sha256(cluster_yaml.read_bytes()).hexdigest() if cluster_yaml.is_file() else None,
        "command": sys.argv,
        "address": args.address,
        "created_at": time.time(),
        "host": platform.node(),
    }


def cmd_status(args) -> int:
    from jobs.driver import CaseState, render_view
    from jobs.plan import PlannedCase
    from jobs.storage import RunDir

    run = RunDir.open(args.run)
    table = run.cases().set_index("case_id")
    manifest = run.manifest()
    states = []
    for case_id, entry in run.ledger().items():
        row = table.loc[case_id]
        case = _case_from_row({**row.to_dict(), "case_id": case_id})
        planned = PlannedCase(case, case_id, row.get("num_cpus", 0), row.get("num_gpus", 0), 0,
                              int(row.get("steps_total", 0)), case.settings.data)
        states.append(CaseState(planned, entry))
    print(f"run {run.location} (suite {manifest.get('suite')}, commit {str(manifest.get('git_commit'))[:10]})")
    print(render_view(states))
    for state in states:
        if state.entry.reason and state.entry.state != "done":
            print(f"  {state.planned.name}: {state.entry.reason_class}: {state.entry.reason}")
    return 0


def cmd_report(args) -> int:
    from analysis.report import write_report
    from jobs.storage import RunDir

    RunDir.open(args.run)  # a one-line error if it is not a run
    path = write_report(args.run, out_dir=args.out, baseline=args.baseline)
    print(path)
    return 0


def cmd_gradcheck(args) -> int:
    from workers import gradcheck

    names = list(gradcheck.CHECK_CONFIGS) if args.model == "all" else [args.model]
    for name in names:
        if name not in gradcheck.CHECK_CONFIGS:
            raise UsageError(f"gradcheck: unknown model {name!r}; expected all or one of {', '.join(gradcheck.CHECK_CONFIGS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return gradcheck.main(names, tolerance=args.tolerance)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "report": cmd_report, "gradcheck": cmd_gradcheck, "cases": cmd_cases}


def cmd_tensorboard(args) -> int:
    from analysis.tensorboard import command

    return command(args.runs, serve=not args.no_serve, port=args.port)


COMMANDS["tensorboard"] = cmd_tensorboard
