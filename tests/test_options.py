"""The options of a study (jobs.options.StudyOptions): `bplab run` and `run_study` take the same
ones, each checked in one place; the lease, the Ray session and the autoscaler request are
given back however the study ends. No Ray is started here."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from jobs import study as study_module
from jobs.cli import build_parser
from jobs.options import StudyOptions, from_arguments
from jobs.study import run_study
from tests.helpers import copy_old_run
from workers.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# Every option, as a command line gives it and as Python gives it (values other than the defaults).
BY_HAND = {
    "suite": (["quick"], "quick"),
    "address": (["--address", "auto"], "auto"),
    "out": (["--out", "runs/x"], "runs/x"),
    "max_retries": (["--max-retries", "5"], 5),
    "commit_every": (["--commit-every", "2.5"], 2.5),
    "checkpoint_every": (["--checkpoint-every", "100"], 100),
    "fresh_worker_per_case": (["--fresh-worker-per-case"], True),
    "worker_max_cases": (["--worker-max-cases", "3"], 3),
    "worker_max_memory_mb": (["--worker-max-memory-mb", "512"], 512.0),
    "progress_every": (["--progress-every", "0"], 0.0),
    "report": (["--no-report"], False),
    "gpus_per_case": (["--gpus-per-case", "0.5"], 0.5),
    "cpus_per_case": (["--cpus-per-case", "2"], 2.0),
    "overrides": (["--set", "epochs=1", "--set", "lr=0.1"], ("epochs=1", "lr=0.1")),
    "only": (["--only", "a", "b*"], ("a", "b*")),
    "resume": (["--resume", "runs/old"], "runs/old"),
}


@pytest.mark.timeout(30)
def test_the_command_line_and_python_take_the_same_options():
    assert set(BY_HAND) == set(StudyOptions.model_fields), "a new option: show how the command line gives it here"
    parser = build_parser()
    # every option at once (resume apart: it excludes --out), and resume with a suite
    for names in ([n for n in BY_HAND if n != "resume"], ["suite", "resume", "overrides", "only"]):
        argv = ["run"] + [word for name in names for word in BY_HAND[name][0]]
        from_cli = from_arguments(parser.parse_args(argv))
        from_python = StudyOptions.of(**{name: BY_HAND[name][1] for name in names})
        assert from_cli == from_python
        for name in names:
            assert getattr(from_cli, name) == BY_HAND[name][1], name
            assert getattr(from_cli, name) != StudyOptions.model_fields[name].default, name
    # nothing given: the defaults, the same on both sides
    assert from_arguments(parser.parse_args(["run", "quick"])) == StudyOptions.of(suite="quick")
    for action in parser._subparsers._group_actions[0].choices["run"]._actions:
        if action.dest != "help":
            assert action.help.rstrip(".") == " ".join(StudyOptions.model_fields[action.dest].description.split()).rstrip(".")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("options, message", [
    ({"max_retries": -1}, "--max-retries -1: must be an integer >= 0"),
    ({"max_retries": "2"}, "--max-retries '2': input should be a valid integer"),
    ({"max_retries": True}, "--max-retries True: input should be a valid integer"),
    ({"cpus_per_case": float("nan")}, "--cpus-per-case nan: must be a finite number > 0"),
    ({"cpus_per_case": 0}, "--cpus-per-case 0.0: must be a finite number > 0"),
    ({"gpus_per_case": 1.5}, "--gpus-per-case 1.5: above 1 it must be a whole number"),
    ({"commit_every": float("inf")}, "--commit-every inf: must be a finite number >= 0"),
    ({"checkpoint_every": -3}, "--checkpoint-every -3: must be an integer >= 0"),
    ({"worker_max_cases": 0}, "--worker-max-cases 0: must be an integer >= 1"),
    ({"worker_max_memory_mb": -1.0}, "--worker-max-memory-mb -1.0: must be a finite number >= 0"),
    ({"progress_every": -1.0}, "--progress-every -1.0: must be a finite number >= 0"),
    ({"report": "no"}, "--no-report 'no': input should be a valid boolean"),
    ({"only": "a"}, "--only 'a': input should be a valid tuple"),
    ({"epochs": 3}, "unknown option 'epochs'"),
    ({"resume": "runs/old"}, "--out and --resume: the resumed run is written where it is"),
    ({"suite": None, "out": None}, "run: give a SUITE (see `bplab cases`) or --resume RUN"),
    ({"suite": None, "out": None, "resume": "runs/old", "overrides": ["epochs=1"]}, "--set needs a suite"),
    ({"address": "nowhere"}, "--address nowhere: expected HOST:PORT"),
])
def test_bad_options_are_one_line_errors_before_anything_is_read(options, message, tmp_path):
    values = {"suite": "quick", "out": str(tmp_path / "run"), **options}
    with pytest.raises(UserError) as error:
        run_study(values.pop("suite"), values.pop("out"), **values)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def _fail_connect(address, runtime_env=None):
    raise UserError(f"cannot connect to Ray at {address or 'a new local cluster'}: refused (test)")


@pytest.mark.timeout(60)
def test_a_start_that_fails_after_the_lease_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "connect", _fail_connect)
    out = tmp_path / "new" / "deep" / "run"
    with pytest.raises(UserError, match="cannot connect"):
        run_study("moons-quick", out, only=["tanh-h3"], stream=io.StringIO())
    assert list(tmp_path.iterdir()) == []  # the folders taking the lease made are gone again


@pytest.mark.timeout(60)
def test_a_resume_that_fails_after_the_lease_gives_the_lease_back(tmp_path, monkeypatch):
    run = copy_old_run(tmp_path)
    monkeypatch.setattr(study_module, "connect", _fail_connect)
    stream = io.StringIO()
    with pytest.raises(UserError, match="cannot connect"):
        run_study(resume=run, stream=stream)
    assert not (run / "driver.lock").exists()  # the dead driver's expired lease was taken over, then given back
    assert "recover:" in stream.getvalue()  # the lease was held when the run was repaired
    ledger = {json.loads(p.read_text())["name"]: json.loads(p.read_text())["state"] for p in (run / "ledger").glob("*.json")}
    assert ledger == {"done": "done", "cut": "pending"}  # recovered: cut runs again from its checkpoint


@pytest.mark.timeout(60)
def test_ray_and_the_autoscaler_request_are_given_back_when_the_body_fails(monkeypatch):
    import ray
    import ray.autoscaler.sdk as sdk

    from jobs import plan, suites

    calls = []
    monkeypatch.setattr(study_module, "connect", lambda address, runtime_env=None: calls.append(("connect", address)))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append(("shutdown",)))
    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, **k: calls.append(("request", len(bundles))))
    suite = suites.load_suite("moons-quick")
    todo = plan.make_plan(suite, plan.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
    with pytest.raises(RuntimeError, match="body"):
        with study_module.ray_session("auto"):
            with study_module.autoscaler_request(types.SimpleNamespace(autoscaling=True), todo, 2, io.StringIO()):
                raise RuntimeError("body")
    assert calls == [("connect", "auto"), ("request", 2), ("request", 0), ("shutdown",)]
    calls.clear()
    with study_module.autoscaler_request(types.SimpleNamespace(autoscaling=False), todo, 2, io.StringIO()):
        pass
    assert calls == []


@pytest.mark.timeout(30)
def test_cases_added_on_resume_are_named_with_their_namesakes():
    """`bplab run SUITE --resume RUN` says which cases it adds; a name the run already holds
    under other settings is pointed out (a suite other than the run's is refused:
    tests/test_bad_input.py)."""
    from jobs.study import added_note

    planned = [types.SimpleNamespace(name=name) for name in ("tanh-h3", "relu-h50", "deep")]
    stored = [{"name": name} for name in "abcdef"]
    assert added_note("runs/q", planned, stored) == "3 new case(s) added to runs/q: tanh-h3, relu-h50, deep"
    again = [types.SimpleNamespace(name="slow-s1")]
    assert added_note("runs/l", again, [{"name": "slow-s1"}, {"name": "mid-s1"}]) == \
        ("1 new case(s) added to runs/l: slow-s1; the run already holds slow-s1 with other settings: "
         "both are kept, under different ids (tables and the report name the later one after what sets it "
         "apart, e.g. NAME [epochs=1], and never average the two)")
    many = [types.SimpleNamespace(name=f"c{i}") for i in range(9)]
    assert added_note("runs/m", many, []) == "9 new case(s) added to runs/m: c0, c1, c2, c3, c4, c5, ... (3 more)"


TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
             "startup or the GCS has become overloaded.")  # what Ray 2.60's Node raises after 30 s


def _slow_start(outcomes: list, started: list):
    """A stand-in for ray.init: each call starts a child process (as Ray's GCS and raylet are),
    then raises Ray's start time-out or returns, as `outcomes` say."""
    import subprocess

    def init(*args, **kwargs):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        if outcomes.pop(0) == "timeout":
            raise Exception(TIMED_OUT)

    return init


@pytest.mark.timeout(60)
def test_a_local_ray_that_misses_its_start_deadline_is_started_once_more(monkeypatch, capsys):
    import ray

    started: list = []
    monkeypatch.setattr(ray, "init", _slow_start(["timeout", "ok"], started))
    try:
        study_module.connect(None)
        assert started[0].wait(timeout=10) == -9  # the failed attempt's processes are stopped
        assert started[1].poll() is None  # the second attempt's are running
        assert "Ray's local start timed out; starting it again" in capsys.readouterr().err
    finally:
        for process in started:
            process.kill()


@pytest.mark.timeout(60)
def test_a_local_ray_that_misses_its_start_deadline_twice_is_a_one_line_error(monkeypatch):
    import ray

    started: list = []
    monkeypatch.setattr(ray, "init", _slow_start(["timeout", "timeout"], started))
    try:
        with pytest.raises(UserError) as error:
            study_module.connect(None)
        message = str(error.value)
        assert message.startswith("cannot connect to Ray at a new local cluster: The current node timed out")
        assert message.endswith("(2 attempts)") and "\n" not in message
        assert [process.wait(timeout=10) for process in started] == [-9, -9]
    finally:
        for process in started:
            process.kill()


@pytest.mark.timeout(120)
def test_a_local_rays_autoscaler_monitor_is_killed_before_ray_shuts_the_node_down(monkeypatch):
    """Ray stops a local node's GCS before its monitor, whose SIGTERM handler then waits on the
    stopped GCS for Ray's whole second of grace: shutdown() kills the monitor first."""
    import ray
    from ray._private import ray_constants, worker

    study_module.connect(None)
    try:
        monitor = worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
        assert monitor.poll() is None
        seen = []
        real = ray.shutdown
        monkeypatch.setattr(ray, "shutdown", lambda *a, **k: (seen.append(monitor.poll()), real(*a, **k)))
        study_module.shutdown()
        assert seen == [-9]  # SIGKILL, before Ray's own shutdown began
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def test_shutdown_of_a_driver_that_started_no_processes_stops_none(monkeypatch):
    """Connected to a cluster, a driver's node is connect-only: nothing of the cluster is killed."""
    import subprocess

    import ray
    from ray._private import worker

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    calls = []
    try:
        node = types.SimpleNamespace(all_processes={"raylet": [types.SimpleNamespace(process=bystander)]})
        monkeypatch.setattr(worker, "_global_node", node)
        monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
        study_module.shutdown()
        assert calls == ["shutdown"] and bystander.poll() is None
        monkeypatch.setattr(worker, "_global_node", None)  # not connected at all
        study_module.shutdown()
        assert calls == ["shutdown", "shutdown"]
    finally:
        bystander.kill()
