"""Run a study from Python: `run_study(suite, out, address=None, ...)`.

The `bplab run` command is argument parsing plus one call to `run_study`; notebooks,
scripts and the benchmarks call it directly::

    from jobs.study import run_study
    result = run_study("quick", "runs/quick-try", overrides=["epochs=1"])
    result.states        # {case_id: "done" | "diverged" | "failed" | ...}

Everything that can be checked without Ray (the suite, the data, the plan, the output
location) is checked before Ray starts; a user error raises one of `USER_ERRORS` with a
one-line message.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """Bad input to a command or to run_study (one line)."""


def user_errors() -> tuple:
    """The exception classes whose message is a one-line user error (exit code 2)."""
    from jobs.plan import PlanError
    from jobs.storage import StorageError
    from jobs.suites import SuiteError
    from workers.data import DataError
    from workers.settings import SettingsError

    return (UsageError, SuiteError, SettingsError, PlanError, StorageError, DataError)


@dataclass
class StudyResult:
    """What a study run left behind."""

    location: str  # the run directory (path or URI)
    states: dict = field(default_factory=dict)  # case_id -> final state of every planned case
    report: str | None = None  # path of report.md, when written

    @property
    def counts(self) -> Counter:
        return Counter(self.states.values())

    @property
    def exit_code(self) -> int:
        """0 every case done or diverged, 1 some case failed."""
        return 1 if self.counts["failed"] else 0


def case_from_row(row: dict):
    """A suite Case from a row of a run's cases table (its settings are stored as JSON)."""
    import json

    from jobs.suites import Case
    from workers import settings as settings_module

    settings = settings_module.from_json(json.loads(row["settings_json"]))
    return Case(row["name"], row.get("group") or row["name"], settings)


def suite_from_run(run, only=(), overrides=()):
    """The cases of an existing run (for a resume without a suite)."""
    from jobs import suites

    if overrides:
        raise suites.SuiteError("--set needs a suite: a resumed run keeps the settings it was started with")
    manifest = run.manifest()
    cases = tuple(case_from_row(row) for row in run.cases().to_dict("records"))
    suite = suites.Suite(manifest.get("suite", "resumed"), manifest.get("description", ""), manifest.get("reference"),
                         cases, manifest.get("suite_source", ""), manifest.get("suite_text", ""))
    return suites.select(suite, list(only))


def load_study(suite, *, only=(), overrides=(), run=None):
    """A Suite from a built-in name, a YAML path, a Suite object or (suite None) a run's cases."""
    from jobs import suites

    if suite is None:
        if run is None:
            raise UsageError("run: give a SUITE (see `bplab cases`) or --resume RUN")
        return suite_from_run(run, only, overrides)
    if isinstance(suite, suites.Suite):
        if overrides:
            raise UsageError("overrides apply to a suite file or name, not to a Suite object")
        return suites.select(suite, list(only))
    return suites.select(suites.load_suite(str(suite), list(overrides)), list(only))


def run_study(suite=None, out: str | os.PathLike | None = None, *, address: str | None = None,
              resume: str | os.PathLike | None = None, only=(), overrides=(), gpus_per_case: float | None = None,
              cpus_per_case: float = 1.0, max_retries: int = 2, commit_every: float = 30.0,
              checkpoint_every: int = 0, fresh_worker_per_case: bool = False, worker_max_cases: int = 50,
              worker_max_memory_mb: float = 0.0, progress_every: float = 10.0, report: bool = True,
              command: list | None = None, stream=None) -> StudyResult:
    """Run every case of `suite` (or what `resume`'s run has not finished) and return the result.

    `suite`: a built-in suite name, a YAML path or a `jobs.suites.Suite`; None with `resume`
    takes the resumed run's own cases. `out`: the run directory (default runs/SUITE-TIME).
    `address`: a Ray address ('auto' inside a cluster); None starts a private local Ray.
    `commit_every`: seconds between a running case's commits (rows + checkpoint; also at its
    end and on Ctrl-C); `checkpoint_every`: also commit every N steps (0: by time only).
    Workers run cases one after another, each for at most `worker_max_cases` cases and while
    its resident memory stays under `worker_max_memory_mb` (0: no limit);
    `fresh_worker_per_case` starts a new process for every case instead.
    """
    from jobs import plan as plan_module
    from jobs.storage import RunDir

    stream = stream or sys.stderr
    check_arguments(max_retries=max_retries, checkpoint_every=checkpoint_every, cpus_per_case=cpus_per_case,
                    gpus_per_case=gpus_per_case, progress_every=progress_every)
    check_address(address)
    if not commit_every >= 0 or commit_every == float("inf"):
        raise UsageError(f"--commit-every {commit_every}: must be a number of seconds >= 0")
    if worker_max_cases < 1:
        raise UsageError(f"--worker-max-cases {worker_max_cases}: must be >= 1")
    if not worker_max_memory_mb >= 0:
        raise UsageError(f"--worker-max-memory-mb {worker_max_memory_mb}: must be >= 0 (0: no limit)")
    run = None
    if resume:
        run = RunDir.open(resume)
        if out:
            raise UsageError("--out and --resume: the resumed run is written where it is")
    study = load_study(suite, only=only, overrides=overrides, run=run)
    datasets = plan_module.load_data(study.cases)
    # impossible requests fail before Ray starts; the GPU default is set once the cluster is known
    planned = plan_module.make_plan(study, datasets, cpus_per_case=cpus_per_case, gpus_per_case=gpus_per_case or 0.0)
    if run is not None:  # the run's cases keep the ids they were made with
        plan_module.adopt_stored_ids(planned, run.cases().to_dict("records"))
    location = str(out) if out else str(runs_root() / f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run is None:
        check_out(location)
        RunDir(location).check_new()

    import ray

    from jobs.driver import TERMINAL, Driver

    # the lease is taken before Ray starts: a second driver is refused at once, in one line
    token = f"{platform.node()}:{os.getpid()}:{time.time()}:{os.urandom(4).hex()}"
    made = None
    if run is None:
        made = _missing_folders(location)
        leased = RunDir(location)
    else:
        leased = run
    try:
        leased.take_lease(token)
    except BaseException:
        _remove_empty(made)
        raise
    states: dict = {}
    view = None
    try:
        if run is not None:  # the lease is held: recover() never repairs a run another driver is writing
            for note in run.recover():
                print(f"[bplab] recover: {note}", file=stream)
        connect(address)
    except BaseException:
        leased.release_lease(token)
        _remove_empty(made)
        raise
    try:
        # what the cluster can launch, not only what is alive: a cold autoscaling cluster has its head only
        view = plan_module.ray_view(address)
        gpus = plan_module.apply_resources(planned, view, gpus_per_case)
        full, _ = plan_module.concurrency(planned, view)
        slots = max(1, full)  # workers the driver keeps: as many as run at once on the fully scaled cluster
        fingerprints = {spec.name: data.fingerprint for spec, data in datasets.items()}
        if run is None:
            run = RunDir.create(location, {**manifest(study, fingerprints, address=address, overrides=overrides,
                                                      command=command),
                                           "data_sets": [d.summary() for d in datasets.values()]},
                                [p.row() for p in planned])
        else:
            known = set(run.case_ids())
            added = run.add_cases([p.row() for p in planned if p.case_id not in known])
            if added:
                print(f"[bplab] {len(added)} new case(s) added to {run.location}", file=stream)
        ledger = run.ledger()
        todo = [p for p in planned if ledger[p.case_id].state not in TERMINAL]
        print(f"[bplab] run {run.location}{_on_host(run.location, view)}: {len(planned)} cases, {len(todo)} to run, "
              f"{plan_module.describe_concurrency(planned, view)} ({gpus:g} GPU, {cpus_per_case:g} CPU each)",
              file=stream, flush=True)
        if view.autoscaling and todo:  # GPU workers start now, not when the scheduler finds no room
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=plan_module.resource_bundles(todo, min(len(todo), full)))
        states = {cid: entry.state for cid, entry in ledger.items() if cid in {p.case_id for p in planned}}
        if todo:
            refs = {spec: ray.put(datasets[spec]) for spec in {p.data_key for p in todo}}  # once per data set
            driver = Driver(run, todo, refs, max_retries=max_retries, checkpoint_every_steps=checkpoint_every,
                            commit_every=commit_every, slots=slots, fresh_worker_per_case=fresh_worker_per_case,
                            worker_max_cases=worker_max_cases, worker_max_memory_mb=worker_max_memory_mb,
                            progress_every=progress_every, out=stream, lease=lambda: _renew(run, token, stream))
            states.update(driver.execute())
    finally:
        try:
            leased.release_lease(token)
        except Exception as error:  # the lease goes stale by itself
            print(f"[bplab] could not release driver.lock: {_one_line(error)}", file=stream)
        if run is None:  # nothing was created (e.g. the plan does not fit the cluster): leave nothing behind
            _remove_empty(made)
        if view is not None and view.autoscaling:
            try:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[])  # idle workers may go again
            except Exception as error:
                print(f"[bplab] could not release the resource request: {_one_line(error)}", file=stream)
        ray.shutdown()
    result = StudyResult(str(run.location), states)
    if report:
        result.report = write_report(run, stream)
    counts = result.counts
    print(f"[bplab] {run.location}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=stream)
    return result


def _renew(run, token: str, stream) -> None:
    from jobs.storage import LeaseLost

    try:
        run.renew_lease(token)
    except LeaseLost:  # another driver took the run over: stop at once
        raise
    except Exception as error:  # a missed heartbeat is not worth stopping the study
        print(f"[bplab] could not refresh driver.lock: {_one_line(error)}", file=stream)


def write_report(run, stream=None) -> str | None:
    """Write the run's report; a report problem never loses the run's results."""
    stream = stream or sys.stderr
    try:
        from analysis.report import Progress
        from analysis.report import write_report as write

        location = str(run.location)
        out_dir = None
        if "://" in location and not location.startswith("file://"):  # remote run: the report goes to a local folder
            out_dir = Path("reports") / location.rstrip("/").rsplit("/", 1)[-1]
        path = write(location, out_dir=out_dir, progress=Progress(stream))  # what it draws, when it takes a while
        print(f"[bplab] report: {path}", file=stream)
        return str(path)
    except Exception as error:
        print(f"[bplab] report not written: {type(error).__name__}: {_one_line(error)}", file=stream)
        return None


def check_arguments(*, max_retries=2, checkpoint_every=200, cpus_per_case=1.0, gpus_per_case=None,
                    progress_every=10.0) -> None:
    """UsageError (one line) for a numeric argument out of range, NaN or infinite."""
    import math

    def number(name, value, low, *, integer=False, strict=False, optional=False):
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if strict else value >= low) and (not integer or float(value).is_integer())
        if not ok:
            kind = "an integer" if integer else "a finite number"
            raise UsageError(f"--{name} {_short(value)}: must be {kind} {'>' if strict else '>='} {low:g}")

    number("max-retries", max_retries, 0, integer=True)
    number("checkpoint-every", checkpoint_every, 0, integer=True)
    number("cpus-per-case", cpus_per_case, 0, strict=True)
    number("gpus-per-case", gpus_per_case, 0, optional=True)
    number("progress-every", progress_every, 0)


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """UsageError (one line, within `timeout` seconds) if `address` is malformed or nothing listens there.

    'auto', 'local' and None are left to Ray; 'HOST:PORT' and 'ray://HOST:PORT' are probed
    with a TCP connection first, so an unreachable address fails at once instead of Ray
    retrying for minutes."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    if not isinstance(address, str) or not address.strip() or len(address) > 1000:
        raise UsageError(f"--address {_short(address)}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    target = address.strip()
    if "://" in target:
        scheme, target = target.split("://", 1)
        if scheme != "ray":
            raise UsageError(f"--address {_short(address)}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    host, _, port_text = target.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--address {_short(address)}: expected HOST:PORT with a port in 1..65535")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as error:
        reason = _one_line(error) if not isinstance(error, socket.timeout) else f"no answer in {timeout:g} s"
        raise UsageError(f"--address {_short(address)}: cannot reach a Ray cluster there ({reason})") from None


def check_out(location: str) -> None:
    """UsageError (one line) if a new run cannot be created at the local path `location`:
    it is a regular file, lies under one, or its nearest existing folder is not writable."""
    import re

    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", location) and not location.startswith("file://"):
        return  # an object store: checked by the first write
    path = Path(location[len("file://"):] if location.startswith("file://") else location).expanduser().absolute()
    if path.is_file():
        raise UsageError(f"--out {_short(location)}: is a regular file, not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--out {_short(location)}: {_short(str(parent))} is a regular file, not a folder")
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {_short(location)}: the folder is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {_short(location)}: cannot create it ({_short(str(parent))} is not writable)")


def _missing_folders(location: str) -> list[Path] | None:
    """The local folders that creating `location` would make, deepest first (None: not local)."""
    import re

    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", location) and not location.startswith("file://"):
        return None
    path = Path(location[len("file://"):] if location.startswith("file://") else location).expanduser().absolute()
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path] | None) -> None:
    """Remove the folders a failed start created (each only if it is empty), deepest first."""
    for folder in folders or []:
        try:
            folder.rmdir()
        except OSError:
            return


def _short(value, limit: int = 80) -> str:
    from workers.errors import shorten

    return shorten(value, limit)


RUNS_ENV = "BPLAB_RUNS"  # where runs go when --out is not given


def in_ray_job() -> bool:
    """True inside a Ray job (`ray job submit`), whose working directory is a temporary copy."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")) or \
        "runtime_resources" in Path.cwd().parts


def runs_root() -> Path:
    """Where a run goes without --out: $BPLAB_RUNS; ~/bplab-runs inside a Ray job (its working
    directory is Ray's temporary copy, deleted with the job); ./runs otherwise."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser()
    return Path.home() / "bplab-runs" if in_ray_job() else Path("runs")


def _on_host(location: str, view) -> str:
    if "://" in location or view is None or view.host is None or not (view.types or in_ray_job()):
        return ""
    return f" (on {view.host}; bring it home with `bplab fetch ADDRESS {location}`)"


def project_runtime_env() -> dict:
    """Ships this copy of jobs/ and workers/ with tasks bplab runs on a cluster's head."""
    return {"py_modules": [str(ROOT / "jobs"), str(ROOT / "workers")]}


def connect(address: str | None, runtime_env: dict | None = None) -> None:
    """Connect to Ray at `address`, or start a private local Ray (never a cluster some other
    process started on this machine)."""
    import ray

    check_address(address)
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", runtime_env=runtime_env,
                     log_to_driver=False)  # the cases' own output goes to RUN/logs
        else:
            ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"cannot connect to Ray at {address or 'a new local cluster'}: {_one_line(error)}") from None


def _one_line(error) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


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


SOURCE_DIRS = ("jobs", "workers", "analysis")


def source_digest(root: Path = ROOT) -> dict:
    """sha256 over the source files that run (jobs/, workers/, analysis/ *.py and the suite
    YAML files): each file's path and content hash, in sorted order. Unlike the git commit it
    survives copies without .git (`ray job submit --working-dir`, `ray up`'s sync)."""
    files = sorted(path for folder in SOURCE_DIRS for pattern in ("*.py", "*.yaml")
                   for path in (root / folder).rglob(pattern) if "__pycache__" not in path.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return {"source_sha256": digest.hexdigest(), "source_files": len(files)}


def manifest(suite, fingerprints: dict, *, address=None, overrides=(), command=None) -> dict:
    """The run's manifest: suite, versions, code version, data fingerprints, cluster.yaml hash."""
    import numpy
    import ray

    cluster_yaml = ROOT / "cluster.yaml"
    return {
        "suite": suite.name,
        "description": suite.description,
        "reference": suite.reference,
        "suite_source": suite.source,
        "suite_text": suite.text,
        "overrides": list(overrides),
        "bplab_version": _version("bplab") or "0.1.0",
        **_git(),
        **source_digest(),
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "numpy": numpy.__version__,
                     "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
                     "pandas": _version("pandas"), "pyarrow": _version("pyarrow"), "imgaug": _version("imgaug")},
        "data_fingerprints": fingerprints,
        "cluster_yaml_sha256": hashlib.sha256(cluster_yaml.read_bytes()).hexdigest() if cluster_yaml.is_file() else None,
        "command": list(command) if command is not None else list(sys.argv),
        "address": address,
        "created_at": time.time(),
        "host": platform.node(),
    }
