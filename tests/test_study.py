"""A study started from Python: `jobs.study.run_study` is what `bplab run` calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from jobs.study import run_study
result = run_study("quick", sys.argv[1], only=["a"], overrides=["epochs=1", "steps_per_epoch=2"],
                   progress_every=0, report=False)
print("RESULT " + json.dumps({"location": result.location, "states": result.states, "exit": result.exit_code}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_study_from_python(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["exit"] == 0 and list(result["states"].values()) == ["done"]
    assert Path(result["location"]) == out
    metrics = pd.read_parquet(out / "metrics")
    assert sorted(metrics[metrics.split == "train"]["step"]) == [0, 1]  # two steps, logged once each
    assert not (out / "driver.lock").exists()  # the lease is given back


def test_run_study_refuses_bad_input_before_ray(tmp_path):
    from jobs.study import run_study
    from workers.errors import UserError

    with pytest.raises(UserError, match="max-retries"):
        run_study("quick", tmp_path / "x", max_retries=-1)
    assert not (tmp_path / "x").exists()
