"""CLI smoke tests of the commands that need no Ray: cases, plan, gradcheck."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import bplab

ROOT = Path(__file__).resolve().parents[1]


def test_cases_lists_suites_and_their_cases():
    listing = bplab("cases")
    assert listing.returncode == 0 and "quick" in listing.stdout and "unfair" in listing.stdout
    quick = bplab("cases", "quick")
    assert quick.returncode == 0
    for name in "abcdef":
        assert f"\n  {name} " in quick.stdout


@pytest.mark.timeout(120)
def test_cases_columns_line_up_whatever_the_longest_name(tmp_path):
    """`bplab cases`: the case counts in one column though adversarial-source-quick is longer
    than the others; `bplab cases FILE`: the settings start in one column whatever a case's name."""
    from tests.helpers import write_suite

    listing = bplab("cases")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("adversarial-source-quick ") for line in lines)
    assert len({line.index(" cases  ") for line in lines}) == 1, listing.stdout
    suite = write_suite(tmp_path, cases={"a": {"lr": 0.1}, "a-case-name-longer-than-the-old-column": {"lr": 0.2}})
    cases = bplab("cases", suite)
    assert cases.returncode == 0, cases.stderr
    rows = [line for line in cases.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 2 and len({line.index("lr=") for line in rows}) == 1, cases.stdout


@pytest.mark.timeout(120)
def test_plan_columns_line_up_for_long_names_and_ids():
    """moons' h5-act_sigmoid has a 25-character id: every row's schedule starts in one column."""
    plan = bplab("plan", "moons", "--only", "h5-*", "h50-*")
    assert plan.returncode == 0, plan.stderr
    rows = [line for line in plan.stdout.splitlines() if " standard " in line or line.startswith("case ")]
    assert any(len(line.split()[1]) > 24 for line in rows[1:]), plan.stdout
    assert len(rows) == 7 and len({line.index("standard" if not line.startswith("case ") else "schedule")
                                   for line in rows}) == 1, plan.stdout


def test_plan_checks_against_cluster_yaml():
    plan = bplab("plan", "quick", "--set", "epochs=2")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0].split()[:3] == ["case", "id", "schedule"]
    # 1438 digits // 16 = 89 steps per epoch, 2 epochs; augmented cases (b, d, f) draw 8 originals
    # a step (plus their 8 copies): 1438 // 8 = 179 steps per epoch; one GPU per case on the GPU workers
    steps = {line.split()[0]: line.split()[-1] for line in lines[1:7]}
    assert steps == {"a": "178", "b": "358", "c": "178", "d": "358", "e": "178", "f": "358"}
    assert all(line.split()[-2] == "1" for line in lines[1:7])
    assert "6 cases, 1608 training steps in all; 6 at once when cluster.yaml is fully scaled (gpu_worker x4: 16 slots)" in plan.stdout


@pytest.mark.timeout(180)
def test_plan_address_local_plans_for_the_local_ray_that_run_starts():
    """`--address local` is the private local Ray that `bplab run` starts (as the README's
    command table says), named so: not "the Ray cluster at local"."""
    plan = bplab("plan", "moons-quick", "--address", "local")
    assert plan.returncode == 0, plan.stderr
    assert "at once on local Ray" in plan.stdout and "cluster at local" not in plan.stdout, plan.stdout


@pytest.mark.timeout(300)
def test_gradcheck_prints_every_layer_and_passes():
    result = bplab("gradcheck", "allconv9")
    assert result.returncode == 0, result.stdout + result.stderr
    for layer in [f"l{i}" for i in range(1, 10)] + ["input"]:
        assert f"  {layer} " in result.stdout
    assert "worst" in result.stdout
    # TensorFlow's own start-up lines (absl, oneDNN: fd 2, whatever TF_CPP_MIN_LOG_LEVEL says) stay off the terminal
    assert result.stderr == "", result.stderr


@pytest.mark.timeout(60)
def test_a_reader_that_leaves_early_ends_the_listing_quietly():
    """`bplab cases | head -0`: the listing stops with 128 + SIGPIPE and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "jobs", "cases"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    process.stdout.close()  # the reader leaves before the listing is written
    _, stderr = process.communicate(timeout=50)
    assert process.returncode == 141, stderr
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr
