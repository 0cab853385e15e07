"""Run a study from Python: `run_study(suite, out, **options)`.

The `bplab run` command is argument parsing plus one call to `run_study`; notebooks,
scripts and the benchmarks call it directly::

    from jobs.study import run_study
    result = run_study("quick", "runs/quick-try", overrides=["epochs=1"])
    result.states        # {case_id: "done" | "diverged" | "failed" | ...}

The options are `jobs.options.StudyOptions` (the same as `bplab run`'s flags). Everything
that can be checked without Ray (the options, the suite, the data, the plan, the output
location) is checked before Ray starts; a user error raises `workers.errors.UserError` (or a
subclass) with a one-line message. `Study.run` tells a run in the order it happens; the run directory's lease,
the Ray session and the autoscaler request are context managers around its middle.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from jobs.options import StudyOptions
from workers.errors import UserError, one_line as _one_line

ROOT = Path(__file__).resolve().parents[1]


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


def suite_from_run(run, only=()):
    """The cases of an existing run (for a resume without a suite)."""
    from jobs import suites

    manifest = run.manifest()
    cases = tuple(case_from_row(row) for row in run.cases().to_dict("records"))
    suite = suites.Suite(manifest.get("suite", "resumed"), manifest.get("description", ""), manifest.get("reference"),
                         cases, manifest.get("suite_source", ""), manifest.get("suite_text", ""))
    return suites.select(suite, list(only))


def load_study(suite, *, only=(), overrides=(), run=None):
    """A Suite from a built-in name, a YAML path, a Suite object or (suite None) a run's cases."""
    from jobs import suites

    if suite is None:
        return suite_from_run(run, only)
    if isinstance(suite, suites.Suite):
        return suites.select(suite, list(only))
    return suites.select(suites.load_suite(str(suite), list(overrides)), list(only))


def run_study(suite=None, out: str | os.PathLike | None = None, *, stream=None, command: list | None = None,
              **options) -> StudyResult:
    """Run every case of `suite` (or what `resume`'s run has not finished) and return the result.

    `suite`: a built-in suite name, a YAML path or a `jobs.suites.Suite`; None with `resume`
    takes the resumed run's own cases. `out`: the run directory (default runs/SUITE-TIME).
    `options`: the other fields of `jobs.options.StudyOptions`, each documented there
    (address, resume, only, overrides, commit_every, report, ...). `stream` gets the progress
    lines (default stderr); `command` is recorded in the manifest (default sys.argv).
    """
    return Study(StudyOptions.of(suite=suite, out=out, **options), stream=stream, command=command).run()


class Study:
    """One run of a study: `run()` reads as what happens, in order."""

    def __init__(self, options: StudyOptions, *, stream=None, command: list | None = None):
        self.options = options
        self.stream = stream or sys.stderr
        self.command = command

    def say(self, text: str) -> None:
        print(f"[bplab] {text}", file=self.stream, flush=True)

    def run(self) -> StudyResult:
        from analysis.rundir import FINISHED, RunDir
        from jobs import plan as plan_module
        from jobs.driver import start_workers, stop_workers

        o = self.options
        # 1. what to run, checked without Ray: the run to resume, the suite, its data, the plan
        old = RunDir.open(o.resume) if o.resume else None
        study = load_study(o.suite, only=o.only, overrides=o.overrides, run=old)
        if old is not None:
            check_same_suite(old, study.name)
        datasets = plan_module.load_data(study.cases)
        # impossible requests fail now; the GPU default is set once the cluster is known
        planned = plan_module.make_plan(study, datasets, cpus_per_case=o.cpus_per_case,
                                        gpus_per_case=o.gpus_per_case or 0.0)
        if old is not None:  # the run's cases keep the ids they were made with
            plan_module.adopt_stored_ids(planned, old.cases().to_dict("records"))
        # 2. where it goes
        started = time.time()  # the default folder's name and the manifest's created_at: one instant
        stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(started))
        location = old.location if old else str(o.out or runs_root() / f"{study.name}-{stamp}")
        if old is None:
            check_out(location)
            RunDir(location).check_new()
        # 3. the run directory for this driver alone (before Ray: a second driver is refused at once), then Ray
        # a new run's lease says what it starts: a driver killed before the manifest still leaves word
        details = None if old else start_details(o.suite, o.only, o.overrides)
        with driver_lease(old or RunDir(location), self.stream, details) as lease:
            if old is not None:  # the lease is held: recover() never repairs a run another driver is writing
                for note in old.recover():
                    self.say(f"recover: {note}")
            with ray_session(o.address):
                # what the cluster can launch, not only what is alive: a cold autoscaling cluster has its head only
                view = plan_module.ray_view(o.address)
                gpus = plan_module.apply_resources(planned, view, o.gpus_per_case)
                full, _ = plan_module.concurrency(planned, view)
                # a new run's first workers start now: their TensorFlow import overlaps what follows
                early = start_workers(planned, max(1, full)) if old is None and not o.fresh_worker_per_case else []
                # 4. the run directory: created, or the resumed one with the suite's new cases added
                run = old or RunDir.create(location, self.manifest(study, datasets, started), [p.row() for p in planned])
                if old is not None:
                    stored = old.cases().to_dict("records")
                    known = {row["case_id"] for row in stored}
                    added = old.add_cases([p.row() for p in planned if p.case_id not in known])
                    if added:
                        added_ids = set(added)
                        self.say(added_note(old.location, [p for p in planned if p.case_id in added_ids], stored))
                ledger = run.ledger()
                todo = [p for p in planned if ledger[p.case_id].state not in FINISHED]
                self.say(f"run {run.location}{_on_host(run.location, view)}: {len(planned)} cases, {len(todo)} to run, "
                         f"{plan_module.describe_concurrency(planned, view)} ({gpus:g} GPU, {o.cpus_per_case:g} CPU each)")
                # 5. the cases, on as many workers as run at once on the fully scaled cluster
                states = {p.case_id: ledger[p.case_id].state for p in planned}
                with autoscaler_request(view, todo, full, self.stream):
                    if todo:
                        states.update(self.execute(run, todo, datasets, max(1, full), lease, early))
                    else:
                        stop_workers(early)
        # 6. the report and the summary
        result = StudyResult(str(run.location), states)
        if o.report:
            result.report = write_report(run, self.stream)
        self.say(f"{run.location}: " + ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items())))
        return result

    def execute(self, run, todo: list, datasets: dict, slots: int, lease: "Lease", workers: list = ()) -> dict:
        """Train the cases `todo` on Ray (on `workers`, started early, and more as needed); case_id -> final state."""
        import ray

        from jobs.driver import Driver

        o = self.options
        refs = {spec: ray.put(datasets[spec]) for spec in {p.data_key for p in todo}}  # once per data set
        driver = Driver(run, todo, refs, max_retries=o.max_retries, checkpoint_every_steps=o.checkpoint_every,
                        commit_every=o.commit_every, slots=slots, fresh_worker_per_case=o.fresh_worker_per_case,
                        worker_max_cases=o.worker_max_cases, worker_max_memory_mb=o.worker_max_memory_mb,
                        progress_every=o.progress_every, out=self.stream, lease=lease.renew, workers=list(workers))
        return driver.execute()

    def manifest(self, study, datasets: dict, created_at: float | None = None) -> dict:
        fingerprints = {spec.name: data.fingerprint for spec, data in datasets.items()}
        return {**manifest(study, fingerprints, address=self.options.address, overrides=self.options.overrides,
                           command=self.command, created_at=created_at),
                "data_sets": [d.summary() for d in datasets.values()]}


def start_details(suite, only=(), overrides=()) -> dict:
    """What `bplab run` needs to start this study again: {suite, only, overrides}. The suite is
    a built-in name as given, or a suite file's absolute path."""
    from jobs import suites

    if isinstance(suite, suites.Suite):
        source = Path(suite.source) if suite.source else None
        name = suite.name if source is None or source.parent == suites.SUITE_DIR else str(source.resolve())
    else:
        path = suites.resolve(str(suite))  # already loaded, so it resolves
        name = str(suite) if path.parent == suites.SUITE_DIR else str(path.resolve())
    return {"suite": name, "only": [str(x) for x in only], "overrides": [str(x) for x in overrides]}


class Lease:
    """This driver's hold on the run's lease (see driver_lease): taken, renewed and given back
    through one RunDir."""

    def __init__(self, rundir, stream):
        self.rundir, self.stream = rundir, stream
        self.token = f"{platform.node()}:{os.getpid()}:{time.time()}:{os.urandom(4).hex()}"

    def renew(self) -> None:
        """The driver's heartbeat. Raises LeaseLost when another driver took the run over."""
        from analysis.rundir import LeaseLost

        try:
            self.rundir.renew_lease(self.token)
        except LeaseLost:  # another driver took the run over: stop at once
            raise
        except Exception as error:  # a missed heartbeat is not worth stopping the study
            print(f"[bplab] could not refresh the run's lease: {_one_line(error)}", file=self.stream)


@contextmanager
def driver_lease(rundir, stream, details: dict | None = None):
    """Hold `rundir`'s lease for the body; give it back at the end. The local folders that
    taking it created are removed again if they are still empty (no run was created).
    `details` (a new run's suite and options, see start_details) are kept in the lease."""
    made = _missing_folders(rundir.location)
    lease = Lease(rundir, stream)
    try:
        rundir.take_lease(lease.token, details=details)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield lease
    finally:
        try:
            rundir.release_lease(lease.token)
        except Exception as error:  # the lease goes stale by itself
            print(f"[bplab] could not release the run's lease: {_one_line(error)}", file=stream)
        _remove_empty(made)  # only empty folders: a created run keeps its own


@contextmanager
def ray_session(address: str | None):
    """Connected to Ray at `address` (None: a private local Ray) for the body."""
    import ray

    connect(address)
    try:
        yield
    finally:
        shutdown()


@contextmanager
def autoscaler_request(view, todo: list, at_once: int, stream):
    """On an autoscaling cluster, ask for the resources of the cases `todo` (at most `at_once`
    at a time) for the body, so the GPU workers start now and together rather than when the
    scheduler finds no room; withdrawn at the end, so idle workers may go again."""
    from jobs import plan as plan_module

    asked = bool(view.autoscaling and todo)
    if asked:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=plan_module.resource_bundles(todo, min(len(todo), at_once)))
    try:
        yield
    finally:
        if asked:
            try:
                request_resources(bundles=[])
            except Exception as error:
                print(f"[bplab] could not release the resource request: {_one_line(error)}", file=stream)


def write_report(run, stream=None) -> str | None:
    """Write the run's report; a report problem never loses the run's results."""
    stream = stream or sys.stderr
    try:
        from analysis.report import Progress
        from analysis.report import write_report as write
        from analysis.rundir import local_path

        location = str(run.location)
        out_dir = None
        if local_path(location) is None:  # remote run: the report goes to a local folder
            out_dir = Path("reports") / location.rstrip("/").rsplit("/", 1)[-1]
        path = write(location, out_dir=out_dir, progress=Progress(stream))  # what it draws, when it takes a while
        print(f"[bplab] report: {path}", file=stream)
        return str(path)
    except Exception as error:
        print(f"[bplab] report not written: {type(error).__name__}: {_one_line(error)}", file=stream)
        return None


def check_out(location: str) -> None:
    """UserError (one line) if a new run cannot be created at the local path `location`:
    it is a regular file, lies under one, or its nearest existing folder is not writable."""
    from analysis.rundir import local_path

    if local_path(location) is None:
        return  # an object store: checked by the first write
    path = Path(local_path(location))
    if path.is_file():
        raise UserError(f"--out {_short(location)}: is a regular file, not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out {_short(location)}: {_short(str(parent))} is a regular file, not a folder")
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {_short(location)}: the folder is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {_short(location)}: cannot create it ({_short(str(parent))} is not writable)")


def _missing_folders(location: str) -> list[Path] | None:
    """The local folders that creating `location` would make, deepest first (None: not local)."""
    from analysis.rundir import local_path

    if local_path(location) is None:
        return None
    path = Path(local_path(location))
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
    from analysis.rundir import is_uri

    if is_uri(location) or view is None or view.host is None or not (view.types or in_ray_job()):
        return ""
    return f" (on {view.host}; bring it home with `bplab fetch ADDRESS {location}`)"


def project_runtime_env() -> dict:
    """Ships this copy of jobs/, workers/ and analysis/ (the run directory's package) with tasks
    bplab runs on a cluster's head."""
    return {"py_modules": [str(ROOT / "jobs"), str(ROOT / "workers"), str(ROOT / "analysis")]}


LOCAL_START_ATTEMPTS = 2  # a private local Ray that did not come up in Ray's 30 s is started once more


def connect(address: str | None, runtime_env: dict | None = None) -> None:
    """Connect to Ray at `address`, or start a private local Ray (never a cluster some other
    process started on this machine). Ray gives a new local node 30 s to register; on a machine
    busy enough to miss that (seen while a test suite and a benchmark shared two cores) the
    processes of that attempt are stopped and Ray is started once more, then a one-line error."""
    import ray

    from jobs.options import check_address, is_local

    check_address(address)
    try:
        if not is_local(address):
            ray.init(address=address, logging_level="ERROR", runtime_env=runtime_env,
                     log_to_driver=False)  # the cases' own output goes to RUN/logs
            return
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            before = _child_pids()
            try:
                ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                return
            except Exception as error:  # Ray raises a bare Exception when its node misses the start deadline
                if "timed out during startup" not in str(error):
                    raise
                _stop_children(_child_pids() - before)  # this attempt's GCS and raylet
                if attempt == LOCAL_START_ATTEMPTS:
                    raise RuntimeError(f"{_one_line(error)} ({attempt} attempts)") from None
                print("[bplab] Ray's local start timed out; starting it again", file=sys.stderr, flush=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = "a new local cluster" if is_local(address) else address
        raise UserError(f"cannot connect to Ray at {where}: {_one_line(error)}") from None


def shutdown() -> None:
    """ray.shutdown(), a second faster where this process started a local Ray.

    Ray stops a local node's GCS before its autoscaler monitor. The monitor answers SIGTERM by
    reporting its end to the GCS, which is gone by then, so Ray waits out its second of grace
    and then kills it: a second of every local run's end. The monitor has nothing to do on a
    local node (no autoscaling), so it is killed first (SIGKILL: its handler would tell the
    driver that the autoscaler failed). A driver connected to a cluster started no processes
    and this stops none; with Ray's internals moved, this is plain ray.shutdown()."""
    import ray

    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
        for info in monitors:
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # Ray's internals moved, or the process is gone: Ray's own shutdown stops it
        pass
    ray.shutdown()


def _child_pids() -> set[int]:
    """The pids of this process's descendants (read from /proc; empty where there is none)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _stop_children(pids: set[int]) -> None:
    """SIGKILL these processes (what a failed local Ray start left running)."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def check_same_suite(run, suite: str) -> None:
    """UserError (one line, before Ray) if `bplab run SUITE --resume RUN` names a suite other than
    the run's: its cases would join the run's under the run's suite name, description and
    report (a schedule's row averaging two studies' models). Cases are added with the run's own
    suite (an edited file keeps its `name:`); two studies are compared with `bplab report`."""
    run_suite = run.manifest().get("suite")
    if run_suite and suite != run_suite:
        raise UserError(f"{run.location} is a run of suite {run_suite}, not {suite}: a run holds one suite (add cases "
                        f"with a suite file whose name: is {run_suite}; compare two runs with `bplab report RUN OTHER_RUN`)")


def added_note(location: str, added, stored: list[dict]) -> str:
    """The line `bplab run SUITE --resume RUN` says when SUITE brings cases the run lacks: how
    many and which, and the names the run already holds under other settings (both cases stay,
    under different ids; `bplab run SUITE --set ...` on a finished run makes such a pair)."""
    names = [p.name for p in added]
    shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
    note = f"{len(added)} new case(s) added to {location}: {shown}"
    same = sorted({str(row["name"]) for row in stored} & set(names))
    if same:
        note += (f"; the run already holds {', '.join(same[:6])}{', ...' if len(same) > 6 else ''} with other "
                 "settings: both are kept, under different ids (tables and the report name the later one after "
                 "what sets it apart, e.g. NAME [epochs=1], and never average the two)")
    return note


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path = ROOT) -> dict:
    """The checkout's commit and whether it has uncommitted changes (files .gitignore names,
    such as a virtual environment made inside it, do not count)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
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


def manifest(suite, fingerprints: dict, *, address=None, overrides=(), command=None,
             created_at: float | None = None) -> dict:
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
        "created_at": time.time() if created_at is None else created_at,
        "host": platform.node(),
    }
