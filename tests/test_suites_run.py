"""Every built-in suite whose data is embedded, and the README's example suite as README.md
prints it, is planned in full and run through the real CLI (`bplab run ... --set epochs=1
--set steps_per_epoch=1`), all in one process with one Ray start.

Every case is planned and its id written to a run directory. Every structure is run for one
step: each case whose code no earlier case ran (`ran_as`: its traced steps' structure,
jobs.driver.case_structure, and which of the per-case settings that choose code it sets:
initialisation, learning-rate schedule, alignment, layer statistics, evaluation), and at
least one case of each suite. A case left out differs from one that ran only in numbers
(seed, learning rate, epochs, ...). The suites other tests run whole, through the same
command, are planned here and not run again (RUN_WHOLE_ELSEWHERE): 45 of the 63 cases run,
in about three minutes on two cores. BPLAB_TEST_ONE_CASE=1 runs one case of each suite instead, of a structure (model,
schedule, engine, quirks, augmentation, activation, optimiser, data set) no earlier suite ran
where the suite has one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import plan, suites
from jobs.driver import case_structure
from analysis.rundir import RunDir
from tests.helpers import QUICK_SUITES
from workers.data import DataError

ROOT = Path(__file__).resolve().parents[1]
FILE_DATA = ("adversarial", "adversarial-source", "dcn", "dni", "unfair", "unfair-source", "feedback")  # MNIST or CIFAR-10 files
EMBEDDED = ("quick", "moons", "moons-quick", "dni-quick", "dcn-quick", "adversarial-quick", "adversarial-source-quick",
            "unfair-source-quick", "feedback-quick")
SHORT = ["--set", "epochs=1", "--set", "steps_per_epoch=1"]
RUN_WHOLE_ELSEWHERE = {  # every case, through `bplab run SUITE` or `python -m jobs run SUITE`
    "quick": "tests/test_runner.py::test_cli_quick_end_to_end (the README's main job)",
    "moons-quick": "tests/test_families.py::test_quick_suite_runs_end_to_end_on_local_ray",
    "dni-quick": "tests/test_families.py::test_quick_suite_runs_end_to_end_on_local_ray",
}

# One Ray for every run: the CLI's own connect and shutdown (study.shutdown, ray.shutdown) are bypassed, nothing else.
RUNNER = """
import json, sys
import ray
import jobs.cli as cli
import jobs.study as study

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
shutdown, study.connect, ray.shutdown = ray.shutdown, (lambda address, runtime_env=None: None), (lambda *a, **k: None)
study.shutdown = lambda: None
codes = {}
try:
    for label, argv in json.loads(sys.argv[1]):
        codes[label] = cli.main(argv)
finally:
    shutdown()
print("EXIT CODES " + json.dumps(codes))
"""


def readme_example() -> str:
    """The suite file the README shows (its yaml block with `cases:`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if re.search(r"^cases:", b, flags=re.M)]
    assert len(found) == 1, "README.md should show exactly one example suite file"
    return found[0]


NUMBERS = ("seed", "lr", "lr_decay", "lr_decay_epochs", "epochs", "init_std", "steps_per_epoch", "dilation_rate",
           "dilation_decay", "data")  # per-case settings that are only numbers (data: in case_structure)


def ran_as(planned) -> str:
    """The code a planned case runs: its structure and the per-case settings that choose code
    (the *_every settings by whether they are on)."""
    from workers.steps import PER_CASE_FIELDS

    values = planned.case.settings.to_dict()
    chosen = {k: (bool(values[k]) if k.endswith("_every") else values[k]) for k in PER_CASE_FIELDS if k not in NUMBERS}
    return json.dumps([case_structure(planned), chosen], sort_keys=True, default=list)


def structure(case) -> str:
    """What decides the code a case runs, not its numbers."""
    values = case.settings.to_dict()
    keep = {k: v for k, v in values.items() if isinstance(v, (str, bool, type(None))) or k == "quirks"}
    keep["data"] = values["data"]["name"]
    return json.dumps(keep, sort_keys=True, default=list)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_embedded_suite_and_the_readme_example_plan_and_run(tmp_path):
    example = tmp_path / "example.yaml"
    example.write_text(readme_example())
    sources = [(name, name) for name in EMBEDDED] + [("readme-example", str(example))]
    assert set(EMBEDDED) | set(FILE_DATA) == set(suites.builtin_names()), "a new built-in suite: list it here"
    assert set(RUN_WHOLE_ELSEWHERE) - {"quick"} <= set(QUICK_SUITES)  # and quick is the README's main job
    for name in FILE_DATA:  # these really need files (none on this machine): the others must not
        with pytest.raises(DataError):
            plan.load_data(suites.load_suite(name).cases)
    every_case = os.environ.get("BPLAB_TEST_ONE_CASE") != "1"
    seen: set[str] = set()
    traced: set[str] = set()  # what every case picked so far ran (ran_as)
    commands, expected = [], {}
    for label, source in sources:
        suite = suites.load_suite(source, SHORT[1::2])
        planned = plan.make_plan(suite, plan.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
        RunDir.create(tmp_path / "ids" / label, {"suite": suite.name}, [p.row() for p in planned])  # every id accepted
        if every_case:
            keys = {p.name: ran_as(p) for p in planned}
            picked = [name for name, key in keys.items() if key not in traced] or [planned[0].name]
            traced.update(keys[name] for name in picked)
        else:  # one case of each suite, of a structure no earlier suite ran if it has one
            fresh = [case for case in suite.cases if structure(case) not in seen]
            picked = [(fresh or suite.cases)[0].name]
            if label == "readme-example":
                picked.append("fast-bs16-s2")  # a name from a grid over something else than seed
        seen.update(structure(case) for case in suite.cases if case.name in picked)
        if label in RUN_WHOLE_ELSEWHERE:
            continue  # planned and its ids written above; run whole by another test
        expected[label] = picked
        commands.append((label, ["run", source, *SHORT, "--out", str(tmp_path / label), "--no-report",
                                 "--progress-every", "0", "--only", *picked]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], capture_output=True, text=True,
                            timeout=1400, cwd=tmp_path, env=env)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    codes = json.loads(result.stdout.split("EXIT CODES ", 1)[1])
    assert codes == {label: 0 for label in expected}, tail
    for label, names in expected.items():
        run = RunDir.open(tmp_path / label)
        ledger = {entry.name: entry for entry in run.ledger().values()}
        assert sorted(ledger) == sorted(names), label
        for name, entry in ledger.items():
            assert (entry.state, entry.step) in (("done", 1), ("diverged", 1)), (label, name, entry)
