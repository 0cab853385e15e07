"""`bplab tensorboard`: event files from the committed Parquet, read back from a live TensorBoard.

A real case is trained in-process (workers.trainer, no Ray) and its two per-epoch reports are
committed one at a time with analysis.rundir as the driver does, so the export sees a live run
grow. `bplab tensorboard RUN --port P` is started as a user starts it; its scalars and
histograms are read over TensorBoard's HTTP API and compared with the Parquet files.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tensorboard")

from jobs.cli import main  # noqa: E402
from analysis.rundir import RunDir  # noqa: E402

from tests.helpers import SETTINGS, case_rows, commit_report, train_reports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(run folder, reports not committed yet): the first epoch is committed."""
    root = tmp_path_factory.mktemp("board") / "run"
    run = RunDir.create(str(root), {"suite": "board"}, case_rows({"mlp-a": SETTINGS}))
    reports = train_reports(SETTINGS)
    assert len(reports) == 2 and reports[0].histograms and reports[0].layer_stats
    commit_report(run, "c0", reports[0])
    return root, run, reports[1:]


def get(port: int, path: str, **query):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for(port: int, tag: str, points: int, plugin: str = "scalars", seconds: float = 90):
    """The tag's data once it has `points` points (TensorBoard loads in the background)."""
    deadline, data = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            data = get(port, f"/data/plugin/{plugin}/{plugin}", tag=tag, run="mlp-a")
            if len(data) >= points:
                return data
        except OSError:
            pass  # not listening yet, or the tag is not loaded yet
        time.sleep(0.5)
    raise AssertionError(f"{tag}: {data and len(data)} points after {seconds} s, wanted {points}")


def logged_steps(folder: Path, tag: str) -> list[int]:
    """The steps of `tag` in every event file of `folder`, read record by record (TFRecord:
    length, crc, event, crc), duplicates kept (TensorBoard itself shows one point per step)."""
    from tensorboard.compat.proto import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def parquet_metrics(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "metrics")


@pytest.mark.timeout(180)
def test_scalars_and_histograms_read_back_over_http(live, capfd):
    from analysis.tensorboard import free_port

    root, run, rest = live
    port = free_port(6106)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "jobs", "tensorboard", str(root), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        first_line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in first_line
        metrics = parquet_metrics(root)
        train = metrics[metrics["split"] == "train"].sort_values("step")
        assert len(train) == 3
        loss = wait_for(port, "train/loss", 3)
        assert [p[1] for p in loss] == train["step"].tolist()
        # values are stored as float32 by TensorBoard's scalar summaries
        np.testing.assert_allclose([p[2] for p in loss], train["cost"].to_numpy(np.float32), rtol=1e-6)
        np.testing.assert_allclose([p[0] for p in loss], train["wall_time"], rtol=1e-12)

        # the live run commits its second epoch; a second export appends only the new steps
        commit_report(run, "c0", rest[0])
        assert main(["tensorboard", str(root), "--no-serve"]) == 0
        assert "new point" in capfd.readouterr().err
        metrics = parquet_metrics(root)
        train = metrics[metrics["split"] == "train"].sort_values("step")
        test = metrics[metrics["split"] == "test"].sort_values("epoch")
        assert len(train) == 6 and len(test) == 2
        loss = wait_for(port, "train/loss", 6)
        assert [p[1] for p in loss] == list(range(6))
        assert logged_steps(root / "tensorboard" / "mlp-a", "train/loss") == list(range(6))  # nothing twice
        assert logged_steps(root / "tensorboard" / "mlp-a", "epoch/test_accuracy") == [1, 2]  # epochs from 1
        np.testing.assert_allclose([p[2] for p in loss], train["cost"].to_numpy(np.float32), rtol=1e-6)
        accuracy = wait_for(port, "epoch/test_accuracy", 2)
        assert [p[1] for p in accuracy] == (test["epoch"] + 1).tolist()
        np.testing.assert_allclose([p[2] for p in accuracy], test["accuracy"].to_numpy(np.float32), rtol=1e-6)
        train_means = train.groupby("epoch")["accuracy"].mean()
        np.testing.assert_allclose([p[2] for p in wait_for(port, "epoch/train_accuracy", 2)],
                                   train_means.to_numpy(np.float32), rtol=1e-6)

        # weights before (step 0) and after (the step after the last): the stored bins and counts
        weights = pd.read_parquet(root / "weights")
        histograms = wait_for(port, "weights/l1/w", 2, plugin="histograms")
        assert [h[1] for h in histograms] == [0, 6]
        for (_, _, buckets), phase in zip(histograms, ("before", "after")):
            stored = weights[(weights["phase"] == phase) & (weights["layer"] == "l1") & (weights["param"] == "w")]
            assert sum(b[2] for b in buckets) == pytest.approx(stored["count"].sum())
            assert buckets[0][0] == pytest.approx(stored["left"].min()) and buckets[-1][1] == pytest.approx(stored["right"].max())
        # per-layer statistics over time (layer_stats_every=2: steps 0, 2, 4)
        stats = pd.read_parquet(root / "layer_stats")
        mean = stats[(stats["layer"] == "l1") & (stats["quantity"] == "act")].sort_values("step")
        points = wait_for(port, "layers/l1/act/mean", 3)
        assert [p[1] for p in points] == mean["step"].tolist() == [0, 2, 4]
        np.testing.assert_allclose([p[2] for p in points], mean["mean"].to_numpy(np.float32), rtol=1e-6)
        # alignment per layer at the measured steps (alignment_every=2: steps 0, 2, 4)
        aligned = pd.read_parquet(root / "alignment")
        for quantity in ("signal_angle", "update_cosine"):
            stored = aligned[(aligned["layer"] == "l2") & (aligned["quantity"] == quantity)].sort_values("step")
            points = wait_for(port, f"alignment/{quantity}/l2", 3)
            assert [p[1] for p in points] == stored["step"].tolist() == [0, 2, 4]
            np.testing.assert_allclose([p[2] for p in points], stored["value"].to_numpy(np.float32), rtol=1e-6, atol=1e-6)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # as Ctrl-C would: bplab stops its TensorBoard
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    # nothing new: no new event file, nothing appended
    folder = root / "tensorboard" / "mlp-a"
    before = sorted(p.name for p in folder.iterdir())
    assert main(["tensorboard", str(root), "--no-serve"]) == 0
    assert "0 new point" in capfd.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before == [
        "events.out.tfevents.0000000001.bplab", "events.out.tfevents.0000000002.bplab"]


@pytest.mark.timeout(120)
def test_export_needs_neither_tensorflow_nor_tensorboard(live, tmp_path):
    root = live[0]
    code = ("import sys; sys.modules['tensorboard'] = None; from analysis.tensorboard import export; "
            f"export({str(root)!r}, {str(tmp_path / 'tb')!r}); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "tb" / "mlp-a").glob("events.out.tfevents.*"))) == 1
    # the files parse with TensorBoard's own protobufs and hold the committed steps
    assert logged_steps(tmp_path / "tb" / "mlp-a", "train/loss") == sorted(
        parquet_metrics(root).query("split == 'train'")["step"].tolist())


@pytest.mark.timeout(60)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capfd):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["tensorboard", str(plain), "--no-serve"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("bplab: error:") and err.count("\n") == 1 and "not a bplab run" in err
    assert list(plain.iterdir()) == []
    assert main(["tensorboard", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capfd.readouterr().err


@pytest.mark.timeout(30)
def test_record_checksums_match_tensorboards():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from analysis.tensorboard import _masked_crc32c

    for data in (b"", b"a", bytes(range(256)) * 3, b"\x00" * 8):
        assert _masked_crc32c(data) == masked_crc32c(data)
