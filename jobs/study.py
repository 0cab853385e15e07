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
              cpus_per_case: float = 1.0, max_retries: int = 2, checkpoint_every: int = 200,
              progress_every: float = 10.0, report: bool = True, command: list | None = None,
              stream=None) -> StudyResult:
    """Run every case of `suite` (or what `resume`'s run has not finished) and return the result.

    `suite`: a built-in suite name, a YAML path or a `jobs.suites.Suite`; None with `resume`
    takes the resumed run's own cases. `out`: the run directory (default runs/SUITE-TIME).
    `address`: a Ray address ('auto' inside a cluster); None starts a private local Ray.
    """
    from jobs import plan as plan_module
    from jobs.storage import RunDir, StorageError

    stream = stream or sys.stderr
    if max_retries < 0:
        raise UsageError(f"--max-retries {max_retries}: must be >= 0")
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {checkpoint_every}: must be >= 0")
    run = None
    if resume:
        run = RunDir.open(resume)
        if out:
            raise UsageError("--out and --resume: the resumed run is written where it is")
    study = load_study(suite, only=only, overrides=overrides, run=run)
    datasets = plan_module.load_data(study.cases)
    # impossible requests fail before Ray starts; the GPU default is set once the cluster is known
    planned = plan_module.make_plan(study, datasets, cpus_per_case=cpus_per_case, gpus_per_case=gpus_per_case or 0.0)
    location = str(out) if out else str(runs_root() / f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run is None:
        probe = RunDir(location)
        if probe.is_run():
            raise StorageError(f"{location} already holds a run: resume it with --resume {location}")

    import ray

    from jobs.driver import TERMINAL, Driver

    token = f"{platform.node()}:{os.getpid()}:{time.time()}:{os.urandom(4).hex()}"
    connect(address)
    states: dict = {}
    view = None
    try:
        # what the cluster can launch, not only what is alive: a cold autoscaling cluster has its head only
        view = plan_module.ray_view(address)
        gpus = plan_module.apply_resources(planned, view, gpus_per_case)
        full, _ = plan_module.concurrency(planned, view)
        fingerprints = {spec.name: data.fingerprint for spec, data in datasets.items()}
        if run is None:
            run = RunDir.create(location, manifest(study, fingerprints, address=address, overrides=overrides,
                                                   command=command), [p.row() for p in planned])
            run.take_lease(token)
        else:
            run.take_lease(token)  # before recover(): never repair a run another driver is writing
            for note in run.recover():
                print(f"[bplab] recover: {note}", file=stream)
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
                            progress_every=progress_every, out=stream, lease=lambda: _renew(run, token, stream))
            states.update(driver.execute())
    finally:
        if run is not None:
            try:
                run.release_lease(token)
            except Exception as error:  # the lease goes stale by itself
                print(f"[bplab] could not release driver.lock: {_one_line(error)}", file=stream)
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
    try:
        run.renew_lease(token)
    except Exception as error:  # a missed heartbeat is not worth stopping the study
        print(f"[bplab] could not refresh driver.lock: {_one_line(error)}", file=stream)


def write_report(run, stream=None) -> str | None:
    """Write the run's report; a report problem never loses the run's results."""
    stream = stream or sys.stderr
    try:
        from analysis.report import write_report as write

        location = str(run.location)
        out_dir = None
        if "://" in location and not location.startswith("file://"):  # remote run: the report goes to a local folder
            out_dir = Path("reports") / location.rstrip("/").rsplit("/", 1)[-1]
        path = write(location, out_dir=out_dir)
        print(f"[bplab] report: {path}", file=stream)
        return str(path)
    except Exception as error:
        print(f"[bplab] report not written: {type(error).__name__}: {_one_line(error)}", file=stream)
        return None


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

    try:
        if address:
            ray.init(address=address, logging_level="ERROR", runtime_env=runtime_env)
        else:
            ray.init(address="local", include_dashboard=False, logging_level="ERROR")
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
