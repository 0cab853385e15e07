"""Report benchmark: the report's wall time and peak memory for 40, 400 and 4,000 cases.

    python benchmarks/bench_report.py [--cases 40 400 4000] [--dir PATH] [--rounds 1] [--json PATH]
                                      [--code PATH ...] [--code-max-cases 400]

1. Generates (once per size; reused from DIR/cases-<n> when it holds a finished study of that
   size) a run directory written through the real storage code, no training: RunDir.create
   (case rows from real CaseSettings: moons MLP, hidden [8], 20 full-batch steps, activation
   relu or tanh x lr 0.5 or 2.0 x n/4 seeds: 4 groups), then per case what the driver writes
   for such a case: write_entry(running), the weight histograms before and after
   (write_histograms, 30 bins per parameter as workers.trainer makes them), the decision
   boundary (write_boundary, the trainer's 120 x 120 grid), one commit of the case's 40
   metrics rows (20 train steps and 20 test rows, workers.trainer's columns) with the ledger
   entry done, and the end-of-case compaction (RunDir.compact_metrics).
2. For each size, in a fresh process per measurement (imports not counted): the reference,
   `analysis.load(RUN, weights=False, layer_stats=False, datasets=[])` (reading the run's
   metrics, cases and ledger: what any report must read), then `write_report(RUN, out_dir=...)`,
   timed apart. Prints wall and CPU seconds, peak RSS of the process (ru_maxrss: the most it
   held at once, load included), the figures drawn, the ratio report / load and, between
   sizes, the growth per case: (report seconds at n2 - at n1) / (n2 - n1).
   --code PATH runs the same measurement with the analysis package of another checkout (e.g.
   the code before a change) on the same run directories, up to --code-max-cases cases.
3. --default-load: instead of 2, a user's plain `analysis.load(RUN)` (every dataset, default
   arguments), then the same and an access of `data.boundary` (the decision-boundary grids),
   each in a fresh process: wall seconds and peak RSS, for this checkout and each --code.

Goals: 400 cases in 5 s or less under 400 MB; 4,000 cases in 30 s or less under 1 GB on 2 cores.
The machine may be shared: the 1-minute load average is printed next to each measurement.
"""

from __future__ import annotations

import argparse
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

MARKER = ".bench_report.json"
EPOCHS = 20  # full-batch: one train step and one test row per epoch
ACTIVATIONS = ("relu", "tanh")
LRS = (0.5, 2.0)
GRID = 120  # workers.trainer.decision_boundary's steps per axis
BINS = 30  # workers.trainer.HISTOGRAM_BINS
GOALS = {400: (5.0, 400.0), 4000: (30.0, 1024.0)}  # cases: (seconds, MB)


def study_cases(n_cases: int) -> list[dict]:
    """Case rows as jobs.plan.PlannedCase.row() builds them, from real CaseSettings."""
    from workers.settings import CaseSettings, DataSpec

    groups = [(activation, lr) for activation in ACTIVATIONS for lr in LRS]
    rows = []
    for index in range(n_cases):
        activation, lr = groups[index % len(groups)]
        seed = index // len(groups)
        group = f"{activation}-lr{lr:g}"
        settings = CaseSettings(model="mlp", hidden=(8,), activation=activation,
                                data=DataSpec(name="moons", samples=200, noise=0.2), optimizer="sgd", lr=lr,
                                batch_size=0, epochs=EPOCHS, seed=seed)
        name = f"{group}-s{seed}"
        case_id = f"{name}-{settings.digest('moons-fingerprint')[:10]}"
        rows.append({"case_id": case_id, "name": name, "group": group, "num_cpus": 1.0, "num_gpus": 0.0,
                     "steps_total": EPOCHS, "settings_json": json.dumps(settings.to_dict(), default=list),
                     **settings.flat()})
    return rows


def case_outputs(index: int, case: dict):
    """(metrics rows, {phase: histogram rows}, boundary columns) of one case, shaped as
    workers.trainer emits them."""
    import numpy as np

    rng = np.random.default_rng([index, 0x4E9])
    skill = 0.8 + 0.18 * rng.random()
    wall = 1.764e9 + 3600 * rng.random()
    rows = []
    updates, layers = json.dumps([1, 1]), json.dumps(["l1", "l2"])
    for epoch in range(EPOCHS):
        level = 0.5 + (skill - 0.5) * (1 - np.exp(-0.25 * (epoch + 1)))
        accuracy = float(np.clip(level + 0.02 * rng.standard_normal(), 0, 1))
        wall += 0.004 * (1 + 0.1 * rng.random())
        rows.append({"split": "train", "epoch": epoch, "step": epoch, "cost": float(-np.log(level)), "accuracy":
                     round(accuracy * 200) / 200, "lr": case["lr"], "stages": 1, "layer_updates": 2,
                     "forward_passes": 1, "examples": 200, "examples_per_sec": 200 / 0.004, "wall_time": wall,
                     "updates": updates, "layers": layers})
        wall += 0.002
        test = float(np.clip(level - 0.02 + 0.02 * rng.standard_normal(), 0, 1))
        rows.append({"split": "test", "epoch": epoch, "step": epoch + 1, "cost": float(-np.log(max(test, 1e-3))),
                     "accuracy": round(test * 1000) / 1000, "wall_time": wall})
    histograms = {}
    shapes = {"l1": {"w": (2, 8), "b": (8,)}, "l2": {"w": (8, 2), "b": (2,)}}
    for phase, scale in (("before", 0.5), ("after", 1.5)):
        phase_rows = []
        for layer, params in shapes.items():
            for param, shape in params.items():
                values = scale * rng.standard_normal(shape)
                counts, edges = np.histogram(values, bins=BINS)
                phase_rows += [{"phase": phase, "layer": layer, "param": param, "bin": b, "left": float(edges[b]),
                                "right": float(edges[b + 1]), "count": int(counts[b])} for b in range(BINS)]
        histograms[phase] = phase_rows
    x0, x1 = np.meshgrid(np.linspace(-1.5, 2.5, GRID), np.linspace(-1.0, 1.5, GRID))
    p1 = 1 / (1 + np.exp(-(3 * x1.ravel() - 2 * np.sin(2 * x0.ravel()) + 0.3 * rng.standard_normal())))
    boundary = {"x0": x0.ravel(), "x1": x1.ravel(), "p1": p1, "label": (p1 >= 0.5).astype(np.int64)}
    return rows, histograms, boundary


def generate(root: Path, n_cases: int, log) -> float:
    """Write the run directory DIR/cases-<n> through analysis.rundir.RunDir; return the seconds."""
    from analysis.rundir import RunDir

    if root.exists():
        if not (root / MARKER).exists():
            raise SystemExit(f"{root} exists and was not made by this script (no {MARKER}); pick another --dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"state": "generating", "cases": n_cases}))
    started = time.perf_counter()
    cases = study_cases(n_cases)
    manifest = {"suite": "bench-report", "description": "synthetic study for benchmarks/bench_report.py",
                "created_at": time.time(), "host": platform.node(), "command": sys.argv, "bplab_version": "bench"}
    run = RunDir.create(root / "run", manifest, cases)
    for index, case in enumerate(cases):
        rows, histograms, boundary = case_outputs(index, case)
        entry = run.entry(case["case_id"])
        entry.state, entry.attempts, entry.node = "running", 1, "node-1"
        entry = run.write_entry(entry)
        for phase, phase_rows in histograms.items():
            run.write_histograms(case["case_id"], phase, phase_rows)
        run.write_boundary(case["case_id"], boundary)
        entry.epoch, entry.step, entry.state = EPOCHS, EPOCHS, "done"
        entry.latest = {"test_accuracy": rows[-1]["accuracy"], "test_epoch": EPOCHS - 1}
        run.commit(case["case_id"], entry, tables={"metrics": rows})
        run.compact_metrics(case["case_id"])
        if (index + 1) % max(1, n_cases // 5) == 0:
            log(f"  generated {index + 1}/{n_cases} cases in {time.perf_counter() - started:.0f} s")
    seconds = time.perf_counter() - started
    (root / MARKER).write_text(json.dumps({"state": "done", "cases": n_cases, "seconds": seconds}))
    return seconds


def generated(base: Path, n_cases: int, log) -> Path:
    """BASE/cases-<n>, generated unless it holds a finished study of that size."""
    folder = base / f"cases-{n_cases}"
    state = json.loads((folder / MARKER).read_text()) if (folder / MARKER).exists() else {}
    if state.get("state") != "done" or state.get("cases") != n_cases:
        log(f"generating {n_cases} cases in {folder} ...")
        log(f"  {generate(folder, n_cases, log):.0f} s")
    return folder


# ---------------------------------------------------------------------- the measured work (child)


def child(args) -> int:
    if args.code:
        sys.path.insert(0, args.code)
    t0 = time.perf_counter()
    import pandas  # noqa: F401

    import analysis
    from analysis.report import write_report

    import_s = time.perf_counter() - t0
    run = str(Path(args.dir) / "run")
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if args.child == "load":  # the run's metrics, cases and ledger (the per-case datasets left out)
        try:
            data = analysis.load(run, weights=False, layer_stats=False, datasets=[])
        except TypeError:  # --code of a checkout whose load reads no other datasets
            data = analysis.load(run, weights=False, layer_stats=False)
        info = {"rows": len(data.metrics)}
    elif args.child in ("load-default", "load-default-boundary"):  # what a user's analysis.load(RUN) holds
        data = analysis.load(run)
        info = {"rows": len(data.metrics)}
        if args.child == "load-default-boundary":
            info["boundary_rows"] = len(data.boundary)
    else:
        out = Path(args.out)
        path = write_report(run, out_dir=out)
        info = {"figures": len(list(out.glob("*.png"))), "report_bytes": path.stat().st_size,
                "analysis_from": str(Path(analysis.__file__).resolve().parent)}
    info["seconds"] = time.perf_counter() - t0
    info["cpu_s"] = time.process_time() - cpu0
    info["import_s"] = import_s
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(info))
    return 0


def run_child(kind: str, folder: Path, out: Path | None, code: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--dir", str(folder)]
    cmd += ["--out", str(out)] if out else []
    cmd += ["--code", code] if code else []
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = code or str(ROOT)
    load1 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(code or ROOT), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["load1"] = load1
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[40, 400, 4000])
    parser.add_argument("--dir", default=None, help="where the run directories go (reused when finished); "
                                                    "default $TMPDIR/bplab-bench-report")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--code", nargs="*", default=[], help="other checkouts to measure the same way")
    parser.add_argument("--code-max-cases", type=int, default=400)
    parser.add_argument("--default-load", action="store_true",
                        help="measure a plain analysis.load(RUN) (and with data.boundary) instead of the report")
    parser.add_argument("--child", choices=("load", "report", "load-default", "load-default-boundary"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.code = args.code[0] if args.code else None
        return child(args)

    def log(message):
        print(message, flush=True)

    base = Path(args.dir or Path(tempfile.gettempdir()) / "bplab-bench-report").resolve()
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "uptime_start": uptime(), "cases": args.cases}
    import matplotlib
    import pandas

    meta.update(pandas=pandas.__version__, matplotlib=matplotlib.__version__)
    log(f"{meta['date']}  {meta['cpu_model']} x{meta['cpus']}  python {meta['python']}  pandas {pandas.__version__}  "
        f"matplotlib {matplotlib.__version__}")
    log(f"uptime at start: {meta['uptime_start']}")
    results = []
    codes = [None, *args.code]
    if args.default_load:
        return default_load(args, base, codes, log)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        for n in args.cases:
            folder = generated(base, n, log)
            for code in codes:
                if code is not None and n > args.code_max_cases:
                    continue
                label = "this checkout" if code is None else code
                for round_index in range(args.rounds):
                    load = run_child("load", folder, None, code)
                    out = Path(scratch) / f"report-{n}-{len(results)}"
                    report = run_child("report", folder, out, code)
                    shutil.rmtree(out, ignore_errors=True)
                    row = {"cases": n, "code": label, "round": round_index, "load": load, "report": report}
                    results.append(row)
                    log(f"  {n:>5} cases [{label}] round {round_index + 1}: report {report['seconds']:6.2f} s "
                        f"(cpu {report['cpu_s']:.2f} s), peak RSS {report['peak_rss_mb']:5.0f} MB, "
                        f"{report['figures']} figures; load {load['seconds']:.2f} s, peak RSS "
                        f"{load['peak_rss_mb']:.0f} MB ({load['rows']} metrics rows); report/load "
                        f"{report['seconds'] / load['seconds']:.1f}x; load1 {report['load1']:.2f}")
    summary = {}
    for code in ("this checkout", *args.code):
        rows = [r for r in results if r["code"] == code]
        sizes = sorted({r["cases"] for r in rows})
        table = {}
        for n in sizes:
            mine = [r for r in rows if r["cases"] == n]
            table[n] = {
                "report_s": statistics.median(r["report"]["seconds"] for r in mine),
                "report_cpu_s": statistics.median(r["report"]["cpu_s"] for r in mine),
                "report_peak_mb": max(r["report"]["peak_rss_mb"] for r in mine),
                "load_s": statistics.median(r["load"]["seconds"] for r in mine),
                "load_peak_mb": max(r["load"]["peak_rss_mb"] for r in mine),
                "figures": mine[0]["report"]["figures"],
            }
        summary[code] = table
        log("")
        log(f"[{code}]")
        log(f"{'cases':>6} {'report s':>9} {'cpu s':>7} {'peak RSS':>9} {'figures':>8} {'load s':>7} "
            f"{'report/load':>11} {'per case (growth)':>27} {'MB per case (growth)':>21}  goal")
        previous = None
        for n, s in table.items():
            growth = growth_mb = ""
            if previous is not None:
                pn, ps = previous
                growth = (f"{(s['report_s'] - ps['report_s']) / (n - pn) * 1000:.2f} ms "
                          f"(cpu {(s['report_cpu_s'] - ps['report_cpu_s']) / (n - pn) * 1000:.2f})")
                growth_mb = f"{(s['report_peak_mb'] - ps['report_peak_mb']) / (n - pn) * 1024:.0f} KB"
            goal = GOALS.get(n)
            verdict = ""
            if goal:
                ok = s["report_s"] <= goal[0] and s["report_peak_mb"] <= goal[1]
                verdict = f"<= {goal[0]:g} s, < {goal[1]:g} MB: {'met' if ok else 'MISSED'}"
            log(f"{n:>6} {s['report_s']:9.2f} {s['report_cpu_s']:7.2f} {s['report_peak_mb']:7.0f}MB "
                f"{s['figures']:>8} {s['load_s']:7.2f} {s['report_s'] / s['load_s']:10.1f}x {growth:>27} "
                f"{growth_mb:>21}  {verdict}")
            previous = (n, s)
    meta["uptime_end"] = uptime()
    log(f"uptime at end: {meta['uptime_end']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "summary": {k: {str(n): v for n, v in t.items()} for k, t in summary.items()},
                       "runs": results}, handle, indent=2)
        log(f"wrote {args.json}")
    return 0


def default_load(args, base: Path, codes: list, log) -> int:
    """Peak memory and wall time of a plain analysis.load(RUN), without and with data.boundary."""
    rows = []
    for n in args.cases:
        folder = generated(base, n, log)
        for round_index in range(args.rounds):
            for code in codes:
                label = "this checkout" if code is None else code
                for kind in ("load-default", "load-default-boundary"):
                    info = run_child(kind, folder, None, code)
                    rows.append({"cases": n, "code": label, "kind": kind, "round": round_index, **info})
                    log(f"  {n:>5} cases [{label}] {kind:<22} {info['seconds']:6.2f} s, peak RSS "
                        f"{info['peak_rss_mb']:5.0f} MB ({info['rows']} metrics rows"
                        f"{', %d boundary rows' % info['boundary_rows'] if 'boundary_rows' in info else ''}); "
                        f"load1 {info['load1']:.2f}")
    log(f"uptime at end: {uptime()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                       "runs": rows}, handle, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
