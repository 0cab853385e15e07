"""Bad input is refused up front: a one-line error, exit 2, no actor started, nothing written.

The requirement: "At least 20 bad inputs (unknown schedule, negative learning rate,
unknown key, wrong type, malformed YAML, missing data folder, more GPUs per case than any node
has, unknown case in `--only`, a `--resume` of a folder that is not a run, ...): each a one-line
error, exit 2, no actor started, no result already written touched."

Every bad input runs `jobs.cli.main(argv)` in-process (tests.helpers.run_main: cwd a fresh tmp
folder) with `ray` replaced in sys.modules by a stub whose every attribute (ray.init, ray.put, ...) is logged and
raises: the inputs must be refused before Ray is touched. A subset (SUBPROCESS, about a third)
also runs the real command, `python -m jobs ...`, in a subprocess: there the exit code and the
whole stderr are the process's, and a `sitecustomize` put on PYTHONPATH wraps `ray.init` and
Ray's actor creation (`ActorClass._remote`) as soon as `ray` is imported, logs every call to a
file and raises (ray.init only when forbidden, actor creation always). Counting
`/tmp/ray/session_*` folders instead would be racy: other processes on this machine start Ray.

Only `--gpus-per-case 64` (more GPUs than any node has) needs Ray to know the nodes; it runs
in a subprocess with ray.init allowed, is marked slow, and is checked for no actor and no run
folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import (QUICK_CASES, QUICK_DEFAULTS, Result, assert_refused, make_existing_run, run_main, tree_state,
                           write_suite)

ROOT = Path(__file__).resolve().parents[1]

GUARD = '''\
"""Test hook of tests/test_bad_input.py: log (and, if asked, forbid) ray.init and actor creation."""
import importlib.abc
import importlib.machinery
import os
import sys

_LOG = os.environ.get("BPLAB_TEST_RAY_LOG")
_FORBID_INIT = os.environ.get("BPLAB_TEST_FORBID_RAY_INIT") == "1"


def _note(what):
    with open(_LOG, "a") as handle:
        handle.write(what + "\\n")


def _patch(ray):
    import ray.actor

    real_init = ray.init

    def init(*args, **kwargs):
        _note("ray.init")
        if _FORBID_INIT:
            raise RuntimeError("bad-input test guard: ray.init was called, so the input was not refused up front")
        return real_init(*args, **kwargs)

    def _remote(self, *args, **kwargs):
        _note("actor " + getattr(getattr(self, "__ray_metadata__", None), "class_name", "?"))
        raise RuntimeError("bad-input test guard: an actor was started for a bad input")

    ray.init = init
    ray.actor.ActorClass._remote = _remote


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
'''


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray_guard")
    (folder / "sitecustomize.py").write_text(GUARD)
    return folder


def run_cli(args, cwd: Path, guard_dir: Path, *, forbid_ray: bool = True, timeout: float = 120) -> Result:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # what a user who just installed bplab has
        env.pop(name, None)
    log = cwd.parent / f"{cwd.name}.ray-log"
    env.update({
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(guard_dir), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "BPLAB_TEST_RAY_LOG": str(log),
        "BPLAB_TEST_FORBID_RAY_INIT": "1" if forbid_ray else "0",
    })
    proc = subprocess.run([sys.executable, "-m", "jobs", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    ray_log = log.read_text().split() if log.exists() else []
    return Result(proc.returncode, proc.stdout, proc.stderr, ray_log)


# ---------------------------------------------------------------------- the bad inputs
#
# label -> (make, names): make(tmp folder, the CLI's cwd) writes what it needs and returns the argv;
# the one-line error must contain every one of names.


def _suite_case(**kwargs):
    def make(tmp):
        return ["run", write_suite(tmp, **kwargs)]
    return make


def _cifar_truncated(tmp):
    folder = tmp / "cifar"
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(b"\x03\x00\x01\x02\x03")  # 5 bytes: not a whole 3073-byte record
    return ["run", write_suite(tmp, defaults={"data": {"name": "cifar10", "path": str(folder)}})]


def _mnist_missing(tmp):
    return ["run", write_suite(tmp, defaults={"data": {"name": "mnist", "path": str(tmp / "no_such_mnist")}})]


def _folder_not_run(tmp):
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run\n")
    return folder


BAD_INPUTS = {
    # ---- settings: values
    "unknown schedule": (_suite_case(cases={"a": {"schedule": "sideways"}}), ["schedule", "sideways", "bad.yaml", "case a"]),
    "negative lr": (_suite_case(defaults={"lr": -0.001}), ["lr", "-0.001"]),
    "zero lr": (_suite_case(defaults={"lr": 0}), ["lr", "must be > 0"]),
    "beta2 = 1": (_suite_case(defaults={"beta2": 1.0}), ["beta2"]),
    "dropout 1.5": (_suite_case(defaults={"dropout": 1.5}), ["dropout"]),
    "unknown model": (_suite_case(defaults={"model": "resnet50"}), ["model", "resnet50"]),
    "a learning rule on a model without feedback weights": (
        _suite_case(defaults={"model": "dni_rnn", "hidden": [3], "data": {"name": "digits", "classes": [0, 1]}},
                    cases={"a": {"schedule": "kolen-pollack"}}),
        ["case a", "kolen-pollack", "dni_rnn", "no feedback hook"]),
    "unknown optimizer": (_suite_case(defaults={"optimizer": "adagrad"}), ["optimizer", "adagrad"]),
    "unknown quirk": (_suite_case(defaults={"quirks": ["elu_derivative_three"]}), ["quirks", "elu_derivative_three"]),
    "unknown data set": (_suite_case(defaults={"data": {"name": "imagenet"}}), ["data.name", "imagenet"]),
    "adversarial with autodiff": (_suite_case(cases={"a": {"schedule": "adversarial", "engine": "autodiff"}}),
                                  ["engine", "autodiff", "adversarial"]),
    "negative seed": (_suite_case(defaults={"seed": -1}), ["seed"]),
    "train_size beyond the data": (_suite_case(defaults={"data": {"name": "digits", "train_size": 100000}}),
                                   ["train_size", "100000"]),
    # ---- settings: keys and types
    "unknown key learning_rate": (_suite_case(defaults={"learning_rate": 0.01}), ["learning_rate", "unknown setting"]),
    "typo epoch": (_suite_case(defaults={"epoch": 3}), ["epoch", "did you mean 'epochs'"]),
    "epochs not a number": (_suite_case(defaults={"epochs": "three"}), ["epochs", "three"]),
    "batch_size 1.5": (_suite_case(defaults={"batch_size": 1.5}), ["batch_size", "1.5"]),
    "augment 'yes'": (_suite_case(cases={"a": {"augment": "yes"}}), ["augment", "yes"]),
    "data not a mapping": (_suite_case(defaults={"data": 5}), ["data"]),
    # ---- the suite file
    "malformed YAML: indentation": (
        lambda tmp: ["run", write_suite(tmp, text="defaults:\n  lr: 0.1\n   epochs: 2\ncases:\n  a: {}\n")],
        ["bad.yaml", "malformed YAML", "line 3"]),
    "malformed YAML: unclosed bracket": (
        lambda tmp: ["run", write_suite(tmp, text="defaults: {lr: 0.1\ncases:\n  a: {schedule: standard}\n")],
        ["bad.yaml", "malformed YAML"]),
    "top level not a mapping": (lambda tmp: ["run", write_suite(tmp, text="- a\n- b\n")], ["bad.yaml", "mapping"]),
    "empty suite file": (lambda tmp: ["run", write_suite(tmp, text="")], ["bad.yaml"]),
    "no cases": (_suite_case(cases={}), ["bad.yaml", "cases"]),
    "unknown top-level key": (_suite_case(extra={"default": {"lr": 0.1}}), ["bad.yaml", "'default'"]),
    "bad case name": (_suite_case(cases={"a b/c": {}}), ["a b/c", "case name"]),
    "grid value not a list": (_suite_case(extra={"grid": {"lr": 0.1}}), ["grid", "lr"]),
    "unknown suite name": (lambda tmp: ["run", "nosuchsuite"], ["nosuchsuite"]),
    "missing suite file": (lambda tmp: ["run", "missing.yaml"], ["missing.yaml"]),
    # ---- data
    "mnist folder missing": (_mnist_missing, ["mnist", "no_such_mnist"]),
    "cifar10 truncated data_batch_1.bin": (_cifar_truncated, ["cifar10", "data_batch_1.bin", "5 bytes"]),
    # ---- command line
    "--only unknown case": (lambda tmp: ["run", write_suite(tmp), "--only", "nosuchcase"], ["--only", "nosuchcase"]),
    "--set without '='": (lambda tmp: ["run", write_suite(tmp), "--set", "epochs"], ["--set", "epochs"]),
    "--set epochs=-1": (lambda tmp: ["run", write_suite(tmp), "--set", "epochs=-1"], ["epochs", "-1"]),
    "--set unknown key": (lambda tmp: ["run", write_suite(tmp), "--set", "epohcs=2"], ["epohcs", "did you mean 'epochs'"]),
    "--max-retries -1": (lambda tmp: ["run", write_suite(tmp), "--max-retries", "-1"], ["--max-retries"]),
    "--max-retries not an int": (lambda tmp: ["run", write_suite(tmp), "--max-retries", "x"], ["--max-retries", "'x'"]),
    "--checkpoint-every -1": (lambda tmp: ["run", write_suite(tmp), "--checkpoint-every", "-1"], ["--checkpoint-every"]),
    "--gpus-per-case -1": (lambda tmp: ["run", write_suite(tmp), "--gpus-per-case", "-1"], ["--gpus-per-case"]),
    "--gpus-per-case 1.5": (lambda tmp: ["run", write_suite(tmp), "--gpus-per-case", "1.5"], ["--gpus-per-case", "1.5"]),
    "unknown flag": (lambda tmp: ["run", write_suite(tmp), "--epochs", "3"], ["--epochs"]),
    "run without a suite": (lambda tmp: ["run"], ["SUITE"]),
    "--resume empty folder": (lambda tmp: (tmp / "empty").mkdir() or ["run", "--resume", "empty"], ["empty", "not a bplab run"]),
    "--resume folder that is not a run": (lambda tmp: ["run", "--resume", _folder_not_run(tmp)], ["notes", "not a bplab run"]),
    "--resume missing folder": (lambda tmp: ["run", "quick", "--resume", "nowhere"], ["nowhere", "no such folder"]),
    "plan: more GPUs than cluster.yaml has": (lambda tmp: ["plan", write_suite(tmp), "--gpus-per-case", "64"],
                                             ["64 GPU", "cluster.yaml"]),
    "status of a non-run folder": (lambda tmp: ["status", _folder_not_run(tmp)], ["notes", "not a bplab run"]),
    "report of a non-run folder": (lambda tmp: ["report", _folder_not_run(tmp)], ["notes", "not a bplab run"]),
    "cases of an unknown suite": (lambda tmp: ["cases", "nosuchsuite"], ["nosuchsuite"]),
    "gradcheck unknown model": (lambda tmp: ["gradcheck", "nosuchmodel"], ["nosuchmodel"]),
}

BAD_INPUTS.update({
    "--commit-every -1": (lambda tmp: ["run", write_suite(tmp), "--commit-every", "-1"], ["--commit-every", "-1"]),
    "--worker-max-cases 0": (lambda tmp: ["run", write_suite(tmp), "--worker-max-cases", "0"], ["--worker-max-cases"]),
    "--worker-max-memory-mb -5": (lambda tmp: ["run", write_suite(tmp), "--worker-max-memory-mb", "-5"],
                                  ["--worker-max-memory-mb"]),
    "--progress-every nan": (lambda tmp: ["run", write_suite(tmp), "--progress-every", "nan"], ["--progress-every", "nan"]),
    "--cpus-per-case 0": (lambda tmp: ["run", write_suite(tmp), "--cpus-per-case", "0"], ["--cpus-per-case"]),
    "lr: .inf": (_suite_case(defaults={"lr": float("inf")}), ["lr"]),
})


# ---- bounds on what a suite file or an argument may ask of the machine
def _alias_bomb_description(tmp):
    body = yaml.safe_dump({"name": "bad", "defaults": QUICK_DEFAULTS, "cases": QUICK_CASES}, sort_keys=False)
    anchors = "\n".join(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10 if i else ["lol"] * 10) + "]" for i in range(9))
    return ["run", write_suite(tmp, text="description:\n" + anchors + "\n" + body)]


def _alias_bomb_setting(tmp):
    body = yaml.safe_dump({"name": "bad", "defaults": QUICK_DEFAULTS}, sort_keys=False)
    anchors = "\n".join(f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10 if i else ["lol"] * 10) + "]" for i in range(9))
    return ["run", write_suite(tmp, text=body + "cases:\n  a:\n    quirks:\n" + anchors + "\n")]


def _deep(tmp):
    return ["run", write_suite(tmp, text="name: bad\ncases:\n  a: {lr: " + "[" * 50000 + "]" * 50000 + "}\n")]


def _million_grid(tmp):
    grid = {"seed": list(range(1000)), "lr": [round(0.001 * (i + 1), 6) for i in range(1000)]}
    return ["run", write_suite(tmp, extra={"grid": grid})]


def _regular_file(tmp):
    (tmp / "afile").write_text("not a folder\n")
    return tmp / "afile"


BAD_INPUTS.update({
    "YAML alias bomb in the description": (_alias_bomb_description, ["bad.yaml", "aliases"]),
    "YAML alias bomb in a setting": (_alias_bomb_setting, ["bad.yaml", "aliases"]),
    "YAML nested 50000 deep": (_deep, ["bad.yaml", "nested deeper"]),
    "duplicate case names": (lambda tmp: ["run", write_suite(tmp, text="name: bad\ncases:\n  a: {lr: 0.1}\n  a: {lr: 0.2}\n")],
                             ["bad.yaml", "duplicate key 'a'", "line 4"]),
    "duplicate setting": (lambda tmp: ["run", write_suite(tmp, text="name: bad\ncases:\n  a: {lr: 0.1, lr: 0.2}\n")],
                          ["bad.yaml", "duplicate key 'lr'"]),
    "two million cases": (_million_grid, ["bad.yaml", "2000000 cases", "10000"]),
    "300-character case name": (_suite_case(cases={"a" * 300: {}}), ["bad.yaml", "at most 100 characters"]),
    "seed 2**64": (_suite_case(defaults={"seed": 2**64}), ["seed", "2147483648"]),
    "data.resize 100000": (_suite_case(defaults={"data": {"name": "digits", "resize": 100000}}), ["data.resize", "1024"]),
    "epochs x steps_per_epoch beyond the maximum": (_suite_case(defaults={"epochs": 10**6, "steps_per_epoch": 10**6}),
                                                    ["epochs", "BPLAB_FORCE_LONG"]),
    "--cpus-per-case nan": (lambda tmp: ["run", write_suite(tmp), "--cpus-per-case", "nan"], ["--cpus-per-case", "nan"]),
    "--gpus-per-case inf": (lambda tmp: ["run", write_suite(tmp), "--gpus-per-case", "inf"], ["--gpus-per-case"]),
    "--out at a regular file": (lambda tmp: ["run", write_suite(tmp), "--out", _regular_file(tmp)], ["afile", "regular file"]),
    "--out under a regular file": (lambda tmp: ["run", write_suite(tmp), "--out", _regular_file(tmp) / "run"],
                                   ["afile", "regular file"]),
    "--address malformed": (lambda tmp: ["run", write_suite(tmp), "--address", "nowhere"], ["--address", "nowhere"]),
    "--address unreachable": (lambda tmp: ["run", write_suite(tmp), "--address", "127.0.0.1:1"],
                              ["--address", "127.0.0.1:1", "cannot reach"]),
    "plan --cpus-per-case nan": (lambda tmp: ["plan", write_suite(tmp), "--cpus-per-case", "nan"], ["--cpus-per-case"]),
    "plan --address unreachable": (lambda tmp: ["plan", write_suite(tmp), "--address", "127.0.0.1:1"],
                                   ["--address", "127.0.0.1:1"]),
})

BAD_INPUTS.update({
    # ---- the mistakes of a first session with the README
    "--set a case the suite lacks": (lambda tmp: ["run", write_suite(tmp), "--set", "zz.epochs=2"],
                                     ["--set zz.epochs=2", "'zz' is neither a setting nor a case", "cases: a, b"]),
    "--set a value of the wrong type": (lambda tmp: ["run", write_suite(tmp), "--set", "lr=abc"],
                                        ["--set lr=abc", "expected a number", "'abc'"]),
    "--only before the suite": (lambda tmp: ["run", "--only", "a", write_suite(tmp)],
                                ["give a SUITE", "--only took every word after it", "put the suite before --only"]),
    "plan --only before the suite": (lambda tmp: ["plan", "--only", "a", write_suite(tmp)],
                                     ["plan: give a SUITE", "put the suite before --only"]),
    "plan without a suite": (lambda tmp: ["plan"], ["plan: give a SUITE"]),
    "gradcheck --tolerance -1": (lambda tmp: ["gradcheck", "mlp", "--tolerance", "-1"], ["--tolerance -1", ">= 0"]),
    "gradcheck --tolerance nan": (lambda tmp: ["gradcheck", "mlp", "--tolerance", "nan"], ["--tolerance nan"]),
})


# These also run as `python -m jobs` in a subprocess (real exit code, real stderr).
SUBPROCESS = ["YAML alias bomb in a setting", "--address unreachable", "--out under a regular file", "--cpus-per-case nan",
              "YAML nested 50000 deep", "--cpus-per-case 0", "unknown schedule", "negative lr", "typo epoch", "augment 'yes'", "malformed YAML: indentation",
              "mnist folder missing", "cifar10 truncated data_batch_1.bin", "--only unknown case",
              "--max-retries not an int", "--resume folder that is not a run", "status of a non-run folder",
              "report of a non-run folder", "gradcheck unknown model", "unknown suite name",
              "--set a value of the wrong type", "--only before the suite"]


def _cases(table: dict, subprocess_labels=(), xfail: dict | None = None):
    params = []
    for label in table:
        marks = [pytest.mark.xfail(strict=True, reason=xfail[label])] if xfail and label in xfail else []
        params.append(pytest.param(label, "in-process", id=f"{label}-in-process", marks=marks))
        if label in subprocess_labels:
            params.append(pytest.param(label, "subprocess", id=f"{label}-subprocess", marks=marks))
    return params


@pytest.fixture
def cli(tmp_path, guard_dir, monkeypatch, capsys):
    """cli(mode, args, cwd) -> Result, in-process or as a subprocess."""

    def run(mode, args, cwd):
        if mode == "subprocess":
            return run_cli(args, cwd, guard_dir)
        return run_main(args, cwd, monkeypatch, capsys)

    return run


@pytest.mark.timeout(150)
@pytest.mark.parametrize("label, mode", _cases(BAD_INPUTS, SUBPROCESS))
def test_bad_input_is_refused_up_front(label, mode, tmp_path, cli):
    make, names = BAD_INPUTS[label]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = cli(mode, make(cwd), cwd)
    assert_refused(result, *names)
    assert not (cwd / "runs").exists(), "a run folder was created for a bad input"


@pytest.mark.timeout(60)
def test_every_numeric_option_of_run_has_a_bad_value_here(tmp_path):
    """An option added to jobs.options.StudyOptions that takes a number gets a bad value in the
    table above (and SUBPROCESS names only entries of it)."""
    from jobs.options import StudyOptions, _scalar_type, flag_of

    assert set(SUBPROCESS) <= set(BAD_INPUTS)
    given = set()
    for number, (make, _) in enumerate(BAD_INPUTS.values()):
        folder = tmp_path / str(number)
        folder.mkdir()
        argv = [str(word) for word in make(folder)]
        if argv[0] == "run":
            given |= {word for word in argv if word.startswith("--")}
    numeric = {flag_of(name) for name, info in StudyOptions.model_fields.items()
               if _scalar_type(info.annotation) in (int, float)}
    assert numeric and numeric <= given, f"no bad value tried for {sorted(numeric - given)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, expected", [
    (["run", "SUITE", "--set", "epoch=2"], "bplab: error: --set epoch=2: unknown setting (did you mean 'epochs'?)"),
    (["run", "SUITE", "--set", "epochs=0"], "bplab: error: --set epochs=0: must be >= 1, got 0 (case a)"),
    (["run", "SUITE", "--set", "b.lr=-1"], "bplab: error: --set b.lr=-1: must be > 0, got -1.0 (case b)"),
    (["run", "SUITE", "--sett", "lr=1"], "bplab: error: unrecognized arguments: --sett lr=1"),
    (["plan", "SUITE", "--gpus-per-case", "x"], "bplab: error: plan: argument --gpus-per-case: invalid float value: 'x'"),
    ([], "bplab: error: give a command: run, plan, fetch, status, report, runs, gradcheck, tensorboard, cases, schema, "
         "logs (bplab COMMAND --help for its options)"),
])
def test_command_line_mistakes_name_what_was_typed(argv, expected, tmp_path, cli):
    """A --set that fails names the --set, not the suite file whose case the value never came
    from; argparse's refusals say `bplab: error:` once; `bplab` alone lists the commands."""
    suite = write_suite(tmp_path)
    result = cli("in-process", [suite if word == "SUITE" else word for word in argv], tmp_path)
    assert assert_refused(result) == expected


@pytest.mark.timeout(60)
def test_typo_learning_rate_gets_a_did_you_mean_hint(tmp_path, cli):
    result = cli("in-process", ["run", write_suite(tmp_path, defaults={"learning_rate": 0.01})], tmp_path)
    assert_refused(result, "learning_rate", "did you mean 'lr'")


# ---------------------------------------------------------------------- existing results untouched


@pytest.fixture
def existing_run(tmp_path):
    location = tmp_path / "cwd" / "old-run"
    location.parent.mkdir()
    make_existing_run(location)
    return location


EXISTING_RUN_INPUTS = {
    "--out an existing run": (lambda run, tmp: ["run", write_suite(tmp), "--out", run], ["old-run", "already holds a run"]),
    "--out an existing run (built-in suite)": (lambda run, tmp: ["run", "quick", "--out", run], ["old-run", "--resume"]),
    "--resume with a bad suite": (
        lambda run, tmp: ["run", write_suite(tmp, cases={"a": {"schedule": "sideways"}}), "--resume", run], ["sideways"]),
    "--resume with a malformed suite": (
        lambda run, tmp: ["run", write_suite(tmp, text="cases: [\n"), "--resume", run], ["malformed YAML"]),
    "--resume with another suite": (lambda run, tmp: ["run", "moons-quick", "--resume", run],
                                    ["old-run is a run of suite quick, not moons-quick"]),
    "--resume with --set but no suite": (lambda run, tmp: ["run", "--resume", run, "--set", "epochs=2"], ["--set"]),
    "--resume with --out": (lambda run, tmp: ["run", "--resume", run, "--out", tmp / "elsewhere"], ["--out", "--resume"]),
    "--resume --only unknown case": (lambda run, tmp: ["run", "--resume", run, "--only", "nosuchcase"], ["nosuchcase"]),
    "--resume with --max-retries -1": (lambda run, tmp: ["run", "--resume", run, "--max-retries", "-1"], ["--max-retries"]),
    "--resume with --cpus-per-case nan": (lambda run, tmp: ["run", "--resume", run, "--cpus-per-case", "nan"],
                                          ["--cpus-per-case"]),
    "--resume with an unreachable --address": (lambda run, tmp: ["run", "--resume", run, "--address", "127.0.0.1:1"],
                                               ["127.0.0.1:1"]),
    "report --baseline zzz": (lambda run, tmp: ["report", run, "--baseline", "zzz", "--out", tmp / "elsewhere"],
                              ["--baseline", "zzz"]),
    "report --out under a regular file": (lambda run, tmp: ["report", run, "--out", _regular_file(tmp) / "report"],
                                          ["afile", "regular file"]),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("label, mode", _cases(EXISTING_RUN_INPUTS, ["--out an existing run", "--resume with a bad suite"]))
def test_bad_input_leaves_an_existing_run_untouched(label, mode, existing_run, cli):
    make, names = EXISTING_RUN_INPUTS[label]
    cwd = existing_run.parent
    before = tree_state(existing_run)
    assert "manifest.json" in before and "ledger/a-0123456789.json" in before
    assert any(name.startswith("metrics/case_id=") for name in before), before
    assert any(name.startswith("checkpoints/") and name.endswith(".npz") for name in before), before
    result = cli(mode, make(existing_run, cwd), cwd)
    assert_refused(result, *names)
    assert tree_state(existing_run) == before, "the existing run's files changed"
    assert not (cwd / "runs").exists() and not (cwd / "elsewhere").exists()


# ---------------------------------------------------------------------- more GPUs than any node (starts Ray)


@pytest.fixture(scope="module")
def too_many_gpus(tmp_path_factory, guard_dir):
    cwd = tmp_path_factory.mktemp("gpus")
    suite = write_suite(cwd)
    result = run_cli(["run", suite, "--gpus-per-case", "64"], cwd, guard_dir, forbid_ray=False, timeout=300)
    return cwd, result


@pytest.mark.slow
def test_more_gpus_per_case_than_any_node_is_refused_before_any_actor(too_many_gpus):
    cwd, result = too_many_gpus
    shown = f"exit {result.code}\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, shown
    assert result.code == 2, shown
    assert result.ray_log == ["ray.init"], f"expected Ray started once and no actor: {result.ray_log}"
    assert "CaseRunner" not in result.stdout + result.stderr, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("bplab")]
    assert len(errors) == 1 and errors[0].startswith("bplab: error: "), shown
    assert "64 GPU" in errors[0] and "case a" in errors[0], errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0], shown
    assert not (cwd / "runs").exists(), "the run folder was created before the resources were checked"


@pytest.mark.slow
def test_more_gpus_per_case_than_any_node_is_a_one_line_error(too_many_gpus):
    cwd, result = too_many_gpus
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.splitlines() if line.startswith("bplab")], (
        result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.timeout(120)
def test_a_long_path_keeps_its_file_name_in_the_error(tmp_path, monkeypatch, capsys):
    """A value too long to echo whole keeps its end: the file a path names."""
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)
    deep.mkdir(parents=True)
    target = _regular_file(deep)
    assert len(str(target)) > 200
    line = assert_refused(run_main(["run", write_suite(tmp_path), "--out", target], tmp_path, monkeypatch, capsys),
                          "afile", "regular file")
    assert f"({len(str(target))} characters)" in line
