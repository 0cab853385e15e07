"""Analysis benchmark: load a big study and build the per-case table, bplab's run
directory against the same rows stored the way Ray Tune stores trial results.

    python benchmarks/bench_analysis.py [--cases 1000] [--rows 10000] [--dir PATH] [--json PATH]
                                        [--rounds 3] [--variants bplab tune-csv tune-json] [--profile]

1. Generates (once; `--dir` is reused when it already holds a finished study of the same
   shape) a synthetic study of `--cases` cases x `--rows` metrics rows: 10 epochs of
   (rows/10 - 1) train rows and 1 test row, with the columns and value ranges of
   workers.trainer (split, epoch, step, cost, accuracy, lr, stages, layer_updates,
   forward_passes, examples, examples_per_sec, wall_time, updates, layers), over 10 groups
   (5 schedules x augment) x cases/10 seeds.
   - DIR/bplab: written the way the driver writes a run: RunDir.create(manifest, case rows
     built from real CaseSettings), write_entry(running), then one RunDir.commit per epoch
     (its train rows + its test row, ledger entry with epoch/step/latest; the last commit
     state done), as jobs.driver does at each end-of-epoch checkpoint (checkpoint bytes
     left out: the analysis never reads them).
   - DIR/tune/<trial>/: the same row dicts as Ray Tune's trial loggers write them:
     progress.csv (csv.DictWriter, header from the first result, as
     ray.tune.logger.CSVLoggerCallback), result.json (one json.dumps line per result, as
     JsonLoggerCallback) and params.json (the trial config: case id, name, group, settings).
2. Times, each run in a fresh Python process (imports not counted; reported apart), in
   `--rounds` rounds whose variant order rotates so load changes hit all alike:
   - bplab:     analysis.load(run, metrics_columns=analysis.PER_CASE_COLUMNS)
                + analysis.per_case(data.metrics, data.cases)
   - tune-csv:  pd.concat([pd.read_csv(p) for p in progress.csv files], keys=case ids)
                + the same per-case columns with pandas groupby
   - tune-json: the same with pd.read_json(p, lines=True, convert_dates=False)
   - bplab-compacted: analysis.load + per_case on DIR/bplab-compacted, the run after the
                driver's end-of-case compaction (RunDir.compact_metrics) of every case: what
                a finished study looks like. "bplab" is the same study before it (parts only,
                as while the cases are still running)
   - bplab-arrow: bplab-compacted with analysis.groupby.aggregate replaced by
                `aggregate_arrow` (below: the same contract on pyarrow's Table.group_by),
                so "table" compares the two group-by engines on the same 10 M rows
   and reports the median seconds (wall and CPU), peak RSS and the ratios to bplab.
3. Checks that the per-case tables agree (ints exactly, floats to 1e-9 relative: pandas'
   default CSV/JSON float parsers are not always correctly rounded).

The files stay in the OS page cache between runs (the machine is shared: no cache drop),
so these are warm-cache numbers for both layouts.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("bplab", "tune-csv", "tune-json", "bplab-compacted", "bplab-arrow")
COMPACTED = "bplab-compacted"  # DIR/bplab-compacted: the run with one metrics part per case
ARROW = "bplab-arrow"  # bplab-compacted with pyarrow's Table.group_by as the group-by engine
EPOCHS = 10
SCHEDULES = ("standard", "unfair-back", "unfair-front", "dilated", "adversarial")
LAYERS = [f"l{i}" for i in range(1, 10)]  # allconv9's unit names
BATCH = 128
MARKER = ".bench_analysis.json"  # written first (state "generating"), completed last
# Columns compared between the tables: exact, and to FLOAT_RTOL relative.
EXACT_COLUMNS = ("epochs", "best_epoch", "last_epoch", "steps", "seed", "name", "group")
FLOAT_COLUMNS = ("final_test_acc", "best_test_acc", "final_train_acc", "gap", "final_test_cost",
                 "final_train_cost", "steps_per_sec", "examples_per_sec", "wall_seconds")
FLOAT_RTOL = 1e-9


# ---------------------------------------------------------------------- machine






def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): less sensitive than wall time
    to other jobs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def du_bytes(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) under path."""
    apparent = allocated = files = 0
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- the synthetic study


def study_cases(n_cases: int) -> list[dict]:
    """Case rows as jobs.plan.PlannedCase.row() builds them, from real CaseSettings."""
    from workers.settings import CaseSettings, DataSpec

    groups = [(schedule, augment) for schedule in SCHEDULES for augment in (False, True)]
    rows = []
    for index in range(n_cases):
        schedule, augment = groups[index % len(groups)]
        seed = index // len(groups)
        group = f"{schedule}{'-aug' if augment else ''}"
        settings = CaseSettings(model="allconv9", data=DataSpec(name="cifar10", standardize="per_pixel"),
                                schedule=schedule, augment=augment, batch_size=BATCH, epochs=EPOCHS, seed=seed,
                                lr=1e-3, lr_schedule="step", lr_decay=0.1, lr_decay_epochs=5)
        name = f"{group}-s{seed}"
        case_id = f"{name}-{settings.digest('cifar10-fingerprint')[:10]}"
        rows.append({"case_id": case_id, "name": name, "group": group, "num_cpus": 1.0, "num_gpus": 0.0,
                     "steps_total": 0, "settings_json": json.dumps(settings.to_dict(), default=list),
                     **settings.flat()})
    return rows


def case_rows(index: int, case: dict, train_per_epoch: int) -> list[list[dict]]:
    """The metrics rows of one case, per epoch (train rows then the test row), as workers.trainer emits them."""
    import numpy as np

    rng = np.random.default_rng([index, 0xBE7C])
    schedule = case["schedule"]
    n_units = len(LAYERS)
    if schedule == "unfair-back":
        updates, stages, forward_passes = list(range(1, n_units + 1)), n_units, n_units + 1
    elif schedule == "unfair-front":
        updates, stages, forward_passes = list(range(n_units, 0, -1)), n_units, n_units + 1
    elif schedule == "adversarial":
        updates, stages, forward_passes = [1] * n_units, 1, 2
    else:
        updates, stages, forward_passes = [1] * n_units, 1, 1
    updates_json, layers_json = json.dumps(updates), json.dumps(LAYERS)
    layer_updates = int(sum(updates))
    seconds_per_step = 0.05 * stages * (1 + 0.2 * rng.random())
    skill = 0.55 + 0.35 * rng.random()  # the accuracy this case converges to
    wall = 1.764e9 + 86400 * rng.random()
    step = 0
    epochs = []
    for epoch in range(case["epochs"]):
        lr = case["lr"] * (case["lr_decay"] ** (epoch // case["lr_decay_epochs"]))
        progress = (epoch * train_per_epoch + np.arange(train_per_epoch)) / (case["epochs"] * train_per_epoch)
        level = 0.1 + (skill - 0.1) * (1 - np.exp(-5 * progress))
        correct = rng.binomial(BATCH, np.clip(level + 0.03, 0, 1))
        accuracy = (correct / BATCH).tolist()
        cost = (-np.log(np.clip(level, 1e-3, 1)) * (1 + 0.15 * rng.standard_normal(train_per_epoch))).tolist()
        durations = seconds_per_step * (1 + 0.1 * rng.standard_normal(train_per_epoch)).clip(0.5)
        walls = (wall + np.cumsum(durations)).tolist()
        eps = (BATCH / durations).tolist()
        steps = range(step, step + train_per_epoch)
        rows = [
            {"split": "train", "epoch": epoch, "step": s, "cost": c, "accuracy": a, "lr": lr, "stages": stages,
             "layer_updates": layer_updates, "forward_passes": forward_passes, "examples": BATCH,
             "examples_per_sec": e, "wall_time": w, "updates": updates_json, "layers": layers_json}
            for s, c, a, e, w in zip(steps, cost, accuracy, eps, walls)
        ]
        step += train_per_epoch
        wall = walls[-1] + 2.0 + rng.random()  # test evaluation
        test_accuracy = round(float(np.clip(level[-1] - 0.05 + 0.02 * rng.standard_normal(), 0, 1)) * 10000) / 10000
        rows.append({"split": "test", "epoch": epoch, "step": step,
                     "cost": float(-np.log(max(test_accuracy, 1e-3)) * 1.1), "accuracy": test_accuracy,
                     "wall_time": wall})
        epochs.append(rows)
    return epochs


def generate(root: Path, n_cases: int, rows_per_case: int, log) -> dict:
    """Write DIR/bplab and DIR/tune; return generation timings."""
    from analysis.rundir import LedgerEntry, RunDir

    train_per_epoch = rows_per_case // EPOCHS - 1
    if train_per_epoch < 1:
        raise SystemExit("--rows must be at least 20 (10 epochs of >= 1 train row + 1 test row)")
    if root.exists():
        marker = root / MARKER
        if not marker.exists():
            raise SystemExit(f"{root} exists and is not a study generated by this script (no {MARKER}); "
                             "pick another --dir")
        log(f"removing the unfinished or different study in {root}")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"state": "generating", "cases": n_cases, "rows": rows_per_case}))
    cases = study_cases(n_cases)
    manifest = {"suite": "bench-analysis", "description": "synthetic study for benchmarks/bench_analysis.py",
                "reference": None, "created_at": time.time(), "host": platform.node(),
                "command": sys.argv, "bplab_version": "bench"}
    tune_root = root / "tune"
    tune_root.mkdir()
    seconds = {"rows": 0.0, "bplab": 0.0, "tune_csv": 0.0, "tune_json": 0.0}
    started = time.perf_counter()
    t = time.perf_counter()
    run = RunDir.create(root / "bplab", manifest, cases)
    seconds["bplab"] += time.perf_counter() - t
    date = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for index, case in enumerate(cases):
        t = time.perf_counter()
        epochs = case_rows(index, case, train_per_epoch)
        t2 = time.perf_counter()
        seconds["rows"] += t2 - t

        # bplab: as jobs.driver does (write_entry running, then a commit per end-of-epoch checkpoint).
        entry = run.entry(case["case_id"])
        entry.state, entry.attempts, entry.node = "running", 1, "node-1"
        entry.info = {"units": LAYERS, "batch": BATCH, "steps_per_epoch": train_per_epoch, "model": "allconv9"}
        entry = run.write_entry(entry)
        for epoch, rows in enumerate(epochs):
            test = rows[-1]
            entry.epoch, entry.step = epoch + 1, test["step"]
            entry.latest = {"test_accuracy": test["accuracy"], "test_cost": test["cost"], "test_epoch": epoch,
                            "train_accuracy": rows[-2]["accuracy"]}
            if epoch == len(epochs) - 1:
                entry.state = "done"
            entry = run.commit(case["case_id"], entry, tables={"metrics": rows})
        t3 = time.perf_counter()
        seconds["bplab"] += t3 - t2

        # Ray Tune: one folder per trial.
        trial = tune_root / f"train_case_{index:05d}_{index}_group={case['group']},seed={case['seed']}_{date}"
        trial.mkdir()
        config = {"case_id": case["case_id"], "name": case["name"], "group": case["group"],
                  **json.loads(case["settings_json"])}
        (trial / "params.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        with open(trial / "progress.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(epochs[0][0].keys()))  # header from the first result
            writer.writeheader()
            for rows in epochs:
                writer.writerows(rows)
        t4 = time.perf_counter()
        seconds["tune_csv"] += t4 - t3
        with open(trial / "result.json", "w") as handle:
            for rows in epochs:
                handle.write("".join(json.dumps(row) + "\n" for row in rows))
        seconds["tune_json"] += time.perf_counter() - t4
        if (index + 1) % max(1, n_cases // 10) == 0 or index + 1 == n_cases:
            done = index + 1
            elapsed = time.perf_counter() - started
            log(f"  generated {done}/{n_cases} cases in {elapsed:.0f} s (eta {elapsed / done * (n_cases - done):.0f} s): "
                + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    seconds["total"] = time.perf_counter() - started
    (root / MARKER).write_text(json.dumps({"state": "done", "cases": n_cases, "rows": rows_per_case,
                                           "generation_seconds": seconds, "generated_at": time.time()}))
    return seconds


# ---------------------------------------------------------------------- the measured work (children)


def compact_copy(root: Path, log) -> float:
    """DIR/bplab-compacted: DIR/bplab (hard-linked) after the driver's own end-of-case step,
    analysis.rundir.RunDir.compact_metrics, for every case: what a finished study looks like.
    analysis.load then reads metrics_compact/ (one file per case). Returns the seconds the
    compaction took (0 if it already existed)."""
    from analysis.rundir import RunDir

    source, target = root / "bplab", root / COMPACTED
    done = target / ".compacted-by-runddir"
    if done.exists():
        return 0.0
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=os.link)  # hard links: no second copy of the parts
    started = time.perf_counter()
    run = RunDir.open(str(target))
    for case_id in run.case_ids():
        run.compact_metrics(case_id)
    seconds = time.perf_counter() - started
    done.write_text("")
    log(f"  RunDir.compact_metrics on all {len(run.case_ids())} cases of {target}: {seconds:.0f} s")
    return seconds


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables).combine_chunks()


def aggregate_arrow(frame, keys, specs, where=None):
    """analysis.groupby.aggregate's contract on pyarrow's Table.group_by (the variant
    bplab-arrow swaps it in): the selected rows and columns go to one Arrow table (nulls for
    NaN, categoricals as dictionaries), one group_by(keys).aggregate(...) call with the
    hash kernels (use_threads=False: first/last need the row order), back to pandas."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if where is not None:
        frame = frame.loc[np.asarray(where, dtype=bool)]
    needed = list(dict.fromkeys([*keys, *[c for c, how in specs.values() if how != "size"]]))
    columns = {}
    for name in needed:
        series = frame[name]
        if isinstance(series.dtype, pd.CategoricalDtype) or name in keys:
            columns[name] = pa.array(series, from_pandas=True)
        else:
            columns[name] = pa.array(series.to_numpy(dtype=np.float64, na_value=np.nan), from_pandas=True)
    table = pa.table(columns) if columns else pa.table({"_": pa.nulls(len(frame))})
    kernels = {"sum": "sum", "mean": "mean", "count": "count", "min": "min", "max": "max", "first": "first",
               "last": "last"}
    aggregations, names = [], []
    for out, (column, how) in specs.items():
        if how == "size":
            aggregations.append(([], "count_all"))
        else:
            aggregations.append((column, kernels[how]))
        names.append(out)
    grouped = table.group_by(list(keys), use_threads=False).aggregate(aggregations)
    # result columns: the keys and the aggregations ("<column>_<kernel>", "count_all"), in order
    result = {key: grouped.column(key).to_pandas() for key in keys}
    positions = [i for i, column in enumerate(grouped.column_names) if column not in keys]
    for index, name in zip(positions, names):
        values = grouped.column(index).to_pandas()
        how = specs[name][1]
        result[name] = values.to_numpy(dtype=np.int64) if how in ("count", "size") else \
            values.to_numpy(dtype=np.float64, na_value=np.nan)
    out = pd.DataFrame(result)
    for key in keys:
        if isinstance(out[key].dtype, pd.CategoricalDtype):
            out[key] = out[key].astype(object)
    mask = np.ones(len(out), dtype=bool)
    for key in keys:
        mask &= out[key].notna().to_numpy()  # rows with a null key are dropped, as the numpy engine does
    return out[mask].reset_index(drop=True)


def work_bplab(root: Path, folder: str = "bplab"):
    import analysis

    if folder == ARROW:  # the compacted study, tabulated with pyarrow's group-by engine
        import analysis.tables

        analysis.tables.aggregate = aggregate_arrow
        folder = COMPACTED
    t0 = time.perf_counter()
    data = analysis.load(root / folder, metrics_columns=analysis.PER_CASE_COLUMNS)
    t1 = time.perf_counter()
    cpu1 = cpu_seconds()
    table = analysis.per_case(data.metrics, data.cases)
    t2 = time.perf_counter()
    return table, {"read_s": t1 - t0, "table_s": t2 - t1, "table_cpu_s": cpu_seconds() - cpu1,
                   "rows": len(data.metrics)}


def tune_trials(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tune").iterdir() if p.is_dir())


def pandas_per_case(df, configs):
    """The per_case columns from Tune-layout rows with pandas groupby.

    df: index (case_id, row) from pd.concat(keys=...), rows in the order logged.
    configs: the trials' params.json dicts.
    """
    import numpy as np
    import pandas as pd

    is_test = (df["split"] == "test").to_numpy()
    test = df.loc[is_test, ["epoch", "cost", "accuracy", "wall_time"]].reset_index(level="case_id")
    train = df.loc[~is_test, ["epoch", "cost", "accuracy", "examples", "wall_time"]]

    by_test = test.groupby("case_id", sort=True)
    out = pd.DataFrame({"epochs": by_test.size(), "final_test_acc": by_test["accuracy"].last(),
                        "final_test_cost": by_test["cost"].last(), "best_test_acc": by_test["accuracy"].max()})
    flat = test.reset_index(drop=True)
    best = flat.loc[flat.groupby("case_id", sort=True)["accuracy"].idxmax()]  # first on ties
    out["best_epoch"] = best.set_index("case_id")["epoch"] + 1  # analysis numbers epochs from 1
    per_epoch = train.groupby(["case_id", "epoch"], sort=True).agg(acc=("accuracy", "mean"), cost=("cost", "mean"))
    last = per_epoch.groupby(level="case_id").tail(1).droplevel("epoch")
    out["final_train_acc"] = last["acc"]
    out["final_train_cost"] = last["cost"]
    out["gap"] = out["final_train_acc"] - out["final_test_acc"]
    by_train = train.groupby(level="case_id", sort=True)
    span = by_train.agg(steps=("epoch", "size"), examples=("examples", "sum"), t_first=("wall_time", "min"),
                        t_last=("wall_time", "max"))
    out["steps"] = span["steps"]
    seconds = span["t_last"] - span["t_first"]
    out["steps_per_sec"] = ((span["steps"] - 1) / seconds).where(seconds > 0)
    out["examples_per_sec"] = out["steps_per_sec"] * span["examples"] / span["steps"]
    by_case = df.groupby(level="case_id", sort=True)
    out["last_epoch"] = by_case["epoch"].max() + 1
    out["wall_seconds"] = by_case["wall_time"].max() - span["t_first"]
    cases = pd.DataFrame([{k: c.get(k) for k in ("case_id", "name", "group", "seed")} for c in configs])
    out = cases.merge(out.reset_index(), on="case_id", how="left")
    out["epochs"] = out["epochs"].fillna(0).astype(np.int64)
    return out.sort_values("case_id", kind="stable").reset_index(drop=True)


def work_tune(root: Path, fmt: str):
    import pandas as pd

    t0 = time.perf_counter()
    trials = tune_trials(root)
    configs, frames = [], []
    for trial in trials:
        with open(trial / "params.json") as handle:
            configs.append(json.load(handle))
        if fmt == "csv":
            frames.append(pd.read_csv(trial / "progress.csv"))
        else:
            # convert_dates=False: by default read_json turns any column named *_time into datetimes.
            frames.append(pd.read_json(trial / "result.json", lines=True, convert_dates=False))
    df = pd.concat(frames, keys=[c["case_id"] for c in configs], names=["case_id", "row"])
    del frames
    t1 = time.perf_counter()
    table = pandas_per_case(df, configs)
    t2 = time.perf_counter()
    return table, {"read_s": t1 - t0, "table_s": t2 - t1, "rows": len(df)}


def child(args) -> int:
    root = Path(args.dir)
    t_import = time.perf_counter()
    import pandas  # noqa: F401  (both sides need it; imported before the clock starts)

    if args.child.startswith("bplab"):
        import analysis  # noqa: F401
    import_s = time.perf_counter() - t_import
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if args.child.startswith("bplab"):
        table, info = work_bplab(root, args.child)
    else:
        table, info = work_tune(root, "csv" if args.child == "tune-csv" else "json")
    info["seconds"] = time.perf_counter() - t0
    info["cpu_s"] = cpu_seconds() - cpu0
    if args.profile:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
    info["import_s"] = import_s
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["cases"] = len(table)
    if args.out:
        keep = ["case_id", *[c for c in (*EXACT_COLUMNS, *FLOAT_COLUMNS) if c in table]]
        table[keep].assign(case_id=table["case_id"].astype(str)).to_pickle(args.out)
    print(json.dumps(info))
    return 0


# ---------------------------------------------------------------------- the parent


def run_child(variant: str, root: Path, out: str | None, profile: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--dir", str(root)]
    cmd += ["--out", out] if out else []
    cmd += ["--profile"] if profile else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["process_s"] = time.perf_counter() - started
    if profile:
        info["profile"] = proc.stderr
    return info


def compare(tables: dict) -> dict:
    """Check the per-case tables agree with bplab's; return the largest differences."""
    import numpy as np
    import pandas as pd

    base = tables["bplab"].sort_values("case_id").reset_index(drop=True)
    report = {}
    for variant, other in tables.items():
        if variant == "bplab":
            continue
        other = other.sort_values("case_id").reset_index(drop=True)
        assert list(base["case_id"]) == list(other["case_id"]), f"{variant}: different cases"
        diffs = {}
        for column in EXACT_COLUMNS:
            a, b = base[column], other[column]
            if column in ("name", "group"):
                equal = a.astype(str).equals(b.astype(str))
            else:
                equal = np.array_equal(a.to_numpy(dtype=np.int64), b.to_numpy(dtype=np.int64))
            assert equal, f"{variant}: column {column} differs from bplab's"
        for column in FLOAT_COLUMNS:
            a, b = base[column].to_numpy(dtype=float), other[column].to_numpy(dtype=float)
            assert np.allclose(a, b, rtol=FLOAT_RTOL, atol=0, equal_nan=True), \
                f"{variant}: column {column} differs from bplab's (max rel {np.nanmax(np.abs(a - b) / np.abs(a)):.3g})"
            with np.errstate(invalid="ignore", divide="ignore"):
                diffs[column] = float(np.nanmax(np.abs(a - b) / np.abs(a)))
        report[variant] = {"cases": len(other), "max_rel_diff": diffs,
                           "exact": list(EXACT_COLUMNS), "close": list(FLOAT_COLUMNS)}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10000, help="metrics rows per case (10 epochs)")
    parser.add_argument("--dir", default=None,
                        help="study folder (reused if it holds a finished study of this shape); "
                             "default: $TMPDIR/bplab-bench-analysis-<cases>x<rows>")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--profile", action="store_true", help="also run bplab once under cProfile and print it")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if "bplab" not in args.variants:
        parser.error("bplab is the reference of every ratio")

    root = Path(args.dir or Path(tempfile.gettempdir()) / f"bplab-bench-analysis-{args.cases}x{args.rows}").resolve()

    def log(message):
        print(message, flush=True)

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "uptime_start": uptime(), "cases": args.cases, "rows_per_case": args.rows, "dir": str(root),
        "rounds": args.rounds,
    }
    import numpy
    import pandas
    import pyarrow

    meta.update(pandas=pandas.__version__, pyarrow=pyarrow.__version__, numpy=numpy.__version__)
    log(f"{meta['date']}  {meta['cpu_model']} x{meta['cpus']}  python {meta['python']}  pandas {pandas.__version__}  "
        f"pyarrow {pyarrow.__version__}")
    log(f"uptime at start: {meta['uptime_start']}")

    marker = root / MARKER
    state = json.loads(marker.read_text()) if marker.exists() else {}
    if state.get("state") == "done" and state.get("cases") == args.cases and state.get("rows") == args.rows:
        log(f"reusing the study in {root} (generated in {state['generation_seconds']['total']:.0f} s)")
        meta["generation_seconds"], meta["generation_reused"] = state["generation_seconds"], True
    else:
        log(f"generating {args.cases} cases x {args.rows} rows in {root} ...")
        meta["generation_seconds"], meta["generation_reused"] = generate(root, args.cases, args.rows, log), False
        meta["uptime_after_generation"] = uptime()
    sizes = {}
    for name, paths in (("bplab", [root / "bplab"]), ("tune", [root / "tune"])):
        sizes[name] = dict(zip(("apparent", "allocated", "files"), du_bytes(paths[0])))
    for fname in ("progress.csv", "result.json", "params.json"):
        apparent = sum((t / fname).stat().st_size for t in tune_trials(root))
        sizes[f"tune/{fname}"] = {"apparent": apparent}
    sizes["bplab/metrics"] = dict(zip(("apparent", "allocated", "files"), du_bytes(root / "bplab" / "metrics")))
    if (COMPACTED in args.variants or ARROW in args.variants) and not args.generate_only:
        meta["compaction_seconds"] = compact_copy(root, log)
        sizes[f"{COMPACTED}/metrics"] = dict(zip(("apparent", "allocated", "files"),
                                                 du_bytes(root / COMPACTED / "metrics")))
    meta["disk"] = sizes
    for name, size in sizes.items():
        log(f"  disk {name:<18} {human(size['apparent']):>10}" + (f"  ({size['files']} files)" if "files" in size else ""))

    if args.generate_only:
        return 0

    results = {v: [] for v in args.variants}
    tables = {}
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as scratch:
        for round_index in range(args.rounds):
            order = args.variants[round_index % len(args.variants):] + args.variants[:round_index % len(args.variants)]
            for variant in order:
                out = os.path.join(scratch, f"{variant}.pkl") if variant not in tables else None
                info = run_child(variant, root, out)
                info["round"], info["load1"] = round_index, os.getloadavg()[0]
                results[variant].append(info)
                if out:
                    tables[variant] = pandas.read_pickle(out)
                log(f"  round {round_index + 1} {variant:<15} {info['seconds']:7.2f} s  cpu {info['cpu_s']:7.2f} s  "
                    f"(read {info['read_s']:.2f} + "
                    f"table {info['table_s']:.2f} (cpu {info.get('table_cpu_s', float('nan')):.2f}); imports {info['import_s']:.2f}; peak RSS "
                    f"{info['peak_rss_mb']:.0f} MB; load1 {info['load1']:.2f})")
        checks = compare(tables)
    for variant, check in checks.items():
        worst = max(check["max_rel_diff"].values())
        log(f"  check {variant}: {check['cases']} cases agree with bplab ({', '.join(EXACT_COLUMNS)} exact; "
            f"floats max rel diff {worst:.2g})")

    summary = {}
    base = statistics.median(r["seconds"] for r in results["bplab"])
    base_cpu = statistics.median(r["cpu_s"] for r in results["bplab"])
    for variant, runs in results.items():
        median = statistics.median(r["seconds"] for r in runs)
        summary[variant] = {
            "median_s": median, "min_s": min(r["seconds"] for r in runs), "max_s": max(r["seconds"] for r in runs),
            "median_read_s": statistics.median(r["read_s"] for r in runs),
            "median_table_s": statistics.median(r["table_s"] for r in runs),
            "median_table_cpu_s": statistics.median(r.get("table_cpu_s", float("nan")) for r in runs),
            "median_import_s": statistics.median(r["import_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "median_load1": statistics.median(r["load1"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rows": runs[0]["rows"],
            "ratio_to_bplab": median / base,
            "cpu_ratio_to_bplab": statistics.median(r["cpu_s"] for r in runs) / base_cpu,
            "ratio_to_bplab_per_round": [r["seconds"] / b["seconds"] for r, b in zip(runs, results["bplab"])],
        }
    meta["uptime_end"] = uptime()
    log("")
    log(f"{'variant':<15} {'median s':>9} {'min':>7} {'max':>7} {'read':>7} {'table':>7} {'tbl cpu':>7} "
        f"{'x bplab':>8} {'cpu s':>7} {'cpu x':>6} {'peak RSS':>9}")
    for variant, s in summary.items():
        log(f"{variant:<15} {s['median_s']:9.2f} {s['min_s']:7.2f} {s['max_s']:7.2f} {s['median_read_s']:7.2f} "
            f"{s['median_table_s']:7.2f} {s['median_table_cpu_s']:7.2f} {s['ratio_to_bplab']:8.1f} {s['median_cpu_s']:7.2f} "
            f"{s['cpu_ratio_to_bplab']:6.1f} {s['peak_rss_mb']:7.0f}MB")
    goal = 3.0
    log(f"bplab goal <= {goal:.0f} s: {'met' if base <= goal else f'MISSED by {base - goal:.2f} s ({base / goal:.2f}x)'}")
    log(f"uptime at end: {meta['uptime_end']}")

    profile = None
    if args.profile:
        info = run_child("bplab", root, None, profile=True)
        profile = info.pop("profile")
        log(profile)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "summary": summary, "runs": results, "checks": checks,
                       "profile": profile}, handle, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
