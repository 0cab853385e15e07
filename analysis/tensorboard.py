"""Export a run's committed Parquet logs as TensorBoard event files, incrementally.

    from analysis.tensorboard import export
    export("runs/quick")        # -> runs/quick/tensorboard/<case name>/events.out.tfevents.*

What one case's folder holds (``step`` is the global train step unless said otherwise):

- ``train/loss``, ``train/accuracy``, ``train/lr``, ``train/examples_per_sec`` and any other
  numeric per-step column (schedule extras): one point per train step.
- ``epoch/test_loss``, ``epoch/test_accuracy``, ``epoch/train_loss``, ``epoch/train_accuracy``:
  one point per epoch with a test row, at step = the epoch counted from 1 (the metrics'
  ``epoch`` + 1, as the report and the live view number epochs); the train values are the
  means over that epoch's train steps.
- ``weights/<layer>/<param>``: histograms of the weights before training (step 0) and after
  (step = the case's last train step + 1), on the bins the run stored.
- ``layers/<layer>/<quantity>`` histograms and ``layers/<layer>/<quantity>/{mean,std,min,max}``
  scalars, from ``layer_stats`` where the case logged them (``layer_stats_every``).
- ``alignment/<quantity>/<layer>`` scalars at each measured step (``alignment_every``): the
  signal's cosine, angle and norm ratio to the true gradient, the update's cosine, the error
  and feedback angles, the synthetic-gradient cosine and error (workers/alignment.py);
  undefined values (NaN) are left out.

Only committed data is read (RunDir.read_case: parts up to the ledger's ``commit_seq``), so the export of a
live run never shows a step that a crashed driver will log again. What was exported is
remembered per case in ``tensorboard/.bplab-export.json`` (last train step, last epoch, last
layer-stats step, histogram phases); a later call appends only what is new, to a new event
file in the same folder (TensorBoard reads them all, in order).

The event files are written here (TFRecord framing and the few protobuf fields needed), so
exporting needs neither TensorFlow nor the tensorboard package; serving them needs the
latter (``pip install 'bplab[tensorboard]'``).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.rundir import FINISHED, RunDir

STATE_FILE = ".bplab-export.json"
INSTALL_HINT = "pip install 'bplab[tensorboard]'"
_EVENTS_RE = re.compile(r"^events\.out\.tfevents\.(\d+)\.bplab$")
# Per-step columns that are bookkeeping, not curves.
_NOT_SCALARS = {"split", "epoch", "step", "wall_time", "updates", "layers", "cost", "accuracy"}


def available() -> bool:
    """True if the tensorboard package can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class CaseExport:
    """What one export call added for one case."""

    name: str
    folder: str
    train_steps: int = 0
    epochs: int = 0
    histograms: int = 0
    layer_points: int = 0
    alignment_points: int = 0

    @property
    def added(self) -> int:
        return self.train_steps + self.epochs + self.histograms + self.layer_points + self.alignment_points


def output_folder(run) -> Path:
    """Where the event files of `run` go: RUN/tensorboard for a local run, else
    ./tensorboard/<run folder name> (TensorBoard reads object stores only through TensorFlow)."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    if run.is_local:
        return Path(run.tensorboard_folder())
    return Path("tensorboard") / posixpath.basename(run.root.rstrip("/"))  # in the current folder


def folder_names(cases: list[tuple[str, str]]) -> dict[str, str]:
    """case_id -> folder name: the case name, made unique (and safe) with the case id."""
    counts: dict[str, int] = {}
    for _, name in cases:
        counts[name] = counts.get(name, 0) + 1
    out = {}
    for case_id, name in cases:
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(name)).strip("._") or case_id
        out[case_id] = safe if counts[name] == 1 else f"{safe}-{case_id}"
    return out


def export(run, out: str | os.PathLike | None = None) -> list[CaseExport]:
    """Append the run's committed data that is not exported yet; one CaseExport per case.

    `run` is a path, URI or analysis.rundir.RunDir; `out` overrides the output folder.
    """
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    out_dir = Path(out) if out is not None else output_folder(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ledger = run.ledger()
    cases = [(str(r["case_id"]), str(r["name"])) for r in run.cases()[["case_id", "name"]].to_dict("records")]
    names = folder_names(cases)
    results = []
    for case_id, name in cases:
        entry = ledger.get(case_id)
        folder = out_dir / names[case_id]
        # event files deleted by hand: export the case again from the start
        done = dict(state.get(case_id, {})) if any(folder.glob("events.out.tfevents.*")) else {}
        finished = entry is not None and entry.state in FINISHED
        result = _export_case(run, case_id, folder, ledger, done, finished)
        result.name = name
        state[case_id] = done
        results.append(result)
        # the state is saved after each case's events are closed: a crash repeats at most one case
        _write_json(state_path, state)
    return results


# ---------------------------------------------------------------------- one case
def _export_case(run, case_id: str, folder: Path, ledger: dict, done: dict, finished: bool) -> CaseExport:
    result = CaseExport(name=case_id, folder=str(folder))
    writer = _LazyWriter(folder)
    try:
        metrics = _read(run, "metrics", case_id, ledger)
        if metrics is not None:
            last_step = done.get("step", -1)
            last_epoch = done.get("epoch", -1)
            result.train_steps = _write_train(writer, metrics, last_step)
            result.epochs = _write_epochs(writer, metrics, last_epoch)
            train = metrics[metrics["split"] == "train"]
            if len(train):
                done["step"] = max(last_step, int(train["step"].max()))
            test = metrics[metrics["split"] == "test"]
            if len(test):
                done["epoch"] = max(last_epoch, int(test["epoch"].max()))
        stats = _read(run, "layer_stats", case_id, ledger)
        if stats is not None and len(stats):
            last = done.get("layer_step", -1)
            result.layer_points = _write_layer_stats(writer, stats, last)
            done["layer_step"] = max(last, int(stats["step"].max()))
        measured = _read(run, "alignment", case_id, ledger)
        if measured is not None and len(measured):
            last = done.get("alignment_step", -1)
            result.alignment_points = _write_alignment(writer, measured, last)
            done["alignment_step"] = max(last, int(measured["step"].max()))
        phases = set(done.get("phases", []))
        weights = _read(run, "weights", case_id, ledger)
        stored = set(weights["phase"].astype(str)) if weights is not None else set()
        for phase, step in (("before", 0), ("after", done.get("step", -1) + 1)):
            if phase in phases or phase not in stored or phase == "after" and not finished:
                continue  # (the driver writes the after-histograms just before the last commit)
            result.histograms += _write_weights(writer, weights[weights["phase"].astype(str) == phase], step)
            phases.add(phase)
        done["phases"] = sorted(phases)
    finally:
        writer.close()
    return result


def _read(run, dataset: str, case_id: str, ledger: dict):
    """The case's committed rows of `dataset` as one frame (None if there are none)."""
    table = run.read_case(dataset, case_id, ledger)
    return table.to_pandas() if table is not None else None


def _write_train(writer, metrics, last_step: int) -> int:
    train = metrics[(metrics["split"] == "train") & (metrics["step"] > last_step)].sort_values("step")
    columns = {"loss": "cost", "accuracy": "accuracy"}
    columns.update({c: c for c in train.columns if c not in _NOT_SCALARS and _numeric(train[c])})
    for row in train.itertuples(index=False):
        values = {tag: getattr(row, column) for tag, column in columns.items()}
        writer.scalars(int(row.step), _wall(row), {f"train/{tag}": v for tag, v in values.items()})
    return len(train)


def _write_epochs(writer, metrics, last_epoch: int) -> int:
    test = metrics[(metrics["split"] == "test") & (metrics["epoch"] > last_epoch)].sort_values("epoch")
    train = metrics[metrics["split"] == "train"]
    means = train.groupby("epoch")[["cost", "accuracy"]].mean() if len(train) else None
    for row in test.itertuples(index=False):
        values = {"epoch/test_loss": row.cost, "epoch/test_accuracy": row.accuracy}
        if means is not None and row.epoch in means.index:
            values["epoch/train_loss"] = means.at[row.epoch, "cost"]
            values["epoch/train_accuracy"] = means.at[row.epoch, "accuracy"]
        writer.scalars(int(row.epoch) + 1, _wall(row), values)
    return len(test)


def _write_weights(writer, table, step: int) -> int:
    count = 0
    for (layer, param), group in table.groupby(["layer", "param"], sort=False):
        group = group.sort_values("bin")
        edges = [float(group["left"].iloc[0]), *group["right"].astype(float)]
        writer.histogram(f"weights/{layer}/{param}", step, None, edges, group["count"].to_numpy())
        count += 1
    return count


def _write_layer_stats(writer, stats, last_step: int) -> int:
    new = stats[stats["step"] > last_step].sort_values("step", kind="stable")
    for row in new.itertuples(index=False):
        tag = f"layers/{row.layer}/{row.quantity}"
        writer.scalars(int(row.step), None, {f"{tag}/{k}": getattr(row, k) for k in ("mean", "std", "min", "max")})
        counts, edges = _as_list(row.hist), _as_list(row.edges)
        if counts is not None and edges is not None and len(edges) == len(counts) + 1:
            writer.histogram(tag, int(row.step), None, edges, np.asarray(counts))
    return len(new)


def _write_alignment(writer, measured, last_step: int) -> int:
    new = measured[(measured["step"] > last_step) & np.isfinite(measured["value"].astype(float))]
    for step, rows in new.sort_values("step", kind="stable").groupby("step", sort=True):
        writer.scalars(int(step), None, {f"alignment/{row.quantity}/{row.layer}": float(row.value)
                                         for row in rows.itertuples(index=False)})
    return len(new)


def _as_list(value):
    if value is None:
        return None
    if isinstance(value, str):
        return json.loads(value)
    return list(value)


def _numeric(series) -> bool:
    return series.dtype.kind in "fiu" and series.notna().any()


def _wall(row):
    value = getattr(row, "wall_time", None)
    return None if value is None or not math.isfinite(value) else float(value)


# ---------------------------------------------------------------------- event files
# TensorBoard's event files, written here without the tensorboard package (it is needed only
# to serve them): a TFRecord file of serialised `Event` protobufs. Field numbers from
# tensorboard/compat/proto/{event,summary}.proto; the tests parse the files with those protos.
_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # CRC-32C (Castagnoli), reflected
    _CRC32C_TABLE.append(_c)


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TFRecord's mask


def _record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf encodes it
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, kind: str, value) -> bytes:
    """One protobuf field: kind is varint, double, float, bytes or doubles (packed)."""
    if kind == "varint":
        return _varint(number << 3) + _varint(value)
    if kind == "double":
        return _varint(number << 3 | 1) + struct.pack("<d", value)
    if kind == "float":
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if kind == "doubles":
        value = struct.pack(f"<{len(value)}d", *value)
    elif isinstance(value, str):
        value = value.encode()
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _event(wall_time: float, step: int = 0, values: list[bytes] = (), file_version: str | None = None) -> bytes:
    """Event{wall_time=1, step=2, file_version=3, summary=5 {value=1 ...}}."""
    out = _field(1, "double", wall_time) + (_field(2, "varint", step) if step else b"")
    if file_version is not None:
        out += _field(3, "bytes", file_version)
    if values:
        out += _field(5, "bytes", b"".join(_field(1, "bytes", v) for v in values))
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value{tag=1, simple_value=2}."""
    return _field(1, "bytes", tag) + _field(2, "float", value)


def _histogram_value(tag: str, edges: np.ndarray, counts: np.ndarray) -> bytes:
    """Summary.Value{tag=1, histo=5 HistogramProto{min=1, max=2, num=3, sum=4, sum_squares=5,
    bucket_limit=6, bucket=7}}; sum and sum of squares from the bin centres."""
    centres = (edges[:-1] + edges[1:]) / 2
    histo = (_field(1, "double", float(edges[0])) + _field(2, "double", float(edges[-1]))
             + _field(3, "double", float(counts.sum())) + _field(4, "double", float((centres * counts).sum()))
             + _field(5, "double", float((centres**2 * counts).sum()))
             + _field(6, "doubles", [float(x) for x in edges[1:]]) + _field(7, "doubles", [float(c) for c in counts]))
    return _field(1, "bytes", tag) + _field(5, "bytes", histo)


class _LazyWriter:
    """One event file per export call and case, created only if something is written.

    Files are named events.out.tfevents.<n>.bplab with n counting up, so their name order
    (the order TensorBoard reads them in) is the order they were written in."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file = None

    def _add(self, step: int, wall_time: float | None, values: list[bytes]) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := _EVENTS_RE.match(p.name))]
            path = self.folder / f"events.out.tfevents.{max(numbers, default=0) + 1:010d}.bplab"
            self._file = open(path, "xb")
            self._file.write(_record(_event(_now(), file_version="brain.Event:2")))
        self._file.write(_record(_event(wall_time if wall_time is not None else _now(), step, values)))

    def scalars(self, step: int, wall_time: float | None, values: dict) -> None:
        items = [_scalar_value(tag, float(v)) for tag, v in values.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if items:
            self._add(step, wall_time, items)

    def histogram(self, tag: str, step: int, wall_time: float | None, edges, counts) -> None:
        """A histogram from bin edges (n+1) and counts (n)."""
        edges, counts = np.asarray(edges, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        self._add(step, wall_time, [_histogram_value(tag, edges, counts)])

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # before the export state says these steps are written
            self._file.close()
            self._file = None


def _now() -> float:
    import time

    return time.time()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- serving
def free_port(start: int = 6006) -> int:
    """The first port from `start` on which 127.0.0.1 can listen."""
    for port in range(start, start + 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logdir_args(folders: dict[str, Path]) -> list[str]:
    """TensorBoard's --logdir (one run) or --logdir_spec (label:folder,...) arguments."""
    if len(folders) == 1:
        return ["--logdir", str(next(iter(folders.values())))]
    return ["--logdir_spec", ",".join(f"{label}:{folder}" for label, folder in folders.items())]


# TensorBoard imports TensorFlow at start-up when it is installed (tens of seconds on a busy
# machine) though the event files are read without it; hidden, TensorBoard starts in seconds
# on its own stub ("reduced feature set": the scalar and histogram dashboards are all there).
_SERVE = "import sys; sys.modules['tensorflow'] = None; from tensorboard.main import run_main; sys.exit(run_main())"


def serve_command(folders: dict[str, Path], port: int) -> list[str]:
    """The command that serves `folders` on 127.0.0.1:`port` (TensorBoard from this Python)."""
    import sys

    return [sys.executable, "-c", _SERVE, *logdir_args(folders), "--host", "127.0.0.1", "--port", str(port)]


def command(runs: list[str], serve: bool = True, port: int | None = None) -> int:
    """`bplab tensorboard RUN [RUN ...]`: export each run, then serve them all on loopback."""
    import subprocess
    import sys

    from workers.errors import UserError

    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"tensorboard: --port {port}: must be between 1 and 65535")
    opened = [RunDir.open(run) for run in runs]  # every run checked before anything is written
    from analysis.load import _run_labels

    folders = dict(zip(_run_labels([run.root for run in opened]), (output_folder(run) for run in opened)))
    for run, folder in zip(opened, folders.values()):
        results = export(run, folder)
        added = sum(r.added for r in results)
        print(f"[bplab] {folder}: {len(results)} case(s), {added} new point(s) and histogram(s)", file=sys.stderr)
    if not serve or not available():
        if serve:  # asked to serve, and cannot
            print(f"[bplab] TensorBoard is not installed, so only the event files were written: {INSTALL_HINT}",
                  file=sys.stderr)
        elif not available():
            print(f"[bplab] (TensorBoard is not installed here: {INSTALL_HINT})", file=sys.stderr)
        print("[bplab] view with: tensorboard " + " ".join(logdir_args(folders)), file=sys.stderr)
        return 0
    port = port if port is not None else free_port()
    print(f"[bplab] TensorBoard at http://127.0.0.1:{port}/ (Ctrl-C stops it; "
          f"run `bplab tensorboard` again to add a live run's new commits)", flush=True)
    log_path = next(iter(folders.values())) / ".tensorboard.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(serve_command(folders, port), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated bplab stops its TensorBoard too
    try:
        code = process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if code:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        print(f"[bplab] TensorBoard stopped (exit {code}): {lines[-1] if lines else ''} (log: {log_path})",
              file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


__all__ = ["export", "CaseExport", "available", "output_folder", "serve_command", "free_port",
           "INSTALL_HINT"]
