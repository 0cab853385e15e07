"""The `bplab` command (also `python -m jobs`).

Exit codes: 0 every case done (or diverged: a result, not a failure), 1 some case
failed, 2 bad input (shown as one line, before anything is launched), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path

from jobs.options import add_arguments, from_arguments, missing_suite
from workers.errors import UserError, one_line as _one_line  # light: no Ray, no TensorFlow at import

PLAN_OPTIONS = ("suite", "address", "gpus_per_case", "cpus_per_case", "overrides", "only")  # what `bplab plan` takes of `run`'s


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default; None and [] are left to the help text to explain."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or action.default is argparse.SUPPRESS or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own errors: one line, exit 2
        command = self.prog.partition(" ")[2]  # "bplab run" -> "run"; main() prints "bplab: error: " itself
        raise UserError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bplab", description="Distributed batch runner for studies of hand-written back propagation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a suite (or resume a run)")
    add_arguments(run)  # every option of jobs.options.StudyOptions, its docstring as help

    plan = sub.add_parser("plan", help="expand a suite: cases, ids, resources, estimated steps")
    add_arguments(plan, PLAN_OPTIONS, help={
        "suite": "Built-in suite name or a YAML file",
        "address": "Check against this Ray cluster (default: cluster.yaml's node types)"})

    fetch = sub.add_parser("fetch", help="copy a run from a cluster's head to this machine")
    fetch.add_argument("address", help="the cluster's Ray address (ray://HOST:10001 through `ray dashboard cluster.yaml -p 10001 --remote-port 10001`, or HOST:6379)")
    fetch.add_argument("run", help="the run directory on the head, as the run printed it (relative paths start at the head's home)")
    fetch.add_argument("dest", nargs="?", default="runs", help="local folder to put it in (default runs)")

    status = sub.add_parser("status", help="the state of every case of a run (reads the ledger; no driver needed)")
    status.add_argument("run")

    report = sub.add_parser("report", help="write report.md, tables (CSV) and figures (PNG) of a run, or of several side by side")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several: one report across them, with a run column)")
    report.add_argument("--baseline", default=None, metavar="[RUN:]CASE",
                        help="case or group to compare every other one with; RUN:CASE names one in another run")
    report.add_argument("--out", default=None, help="output folder (default: RUN/report, RUN/report-vs-BASELINE with "
                        "--baseline, reports/RUN1+RUN2... for several runs)")

    runs = sub.add_parser("runs", help="list the runs in a folder: suite, created, case states, wall time")
    runs.add_argument("folder", nargs="?", default="runs", help="folder holding run directories")

    grad = sub.add_parser("gradcheck", help="hand-written gradients vs tf.GradientTape, per layer")
    grad.add_argument("model", nargs="?", default="all", help="a model name, or all")
    grad.add_argument("--tolerance", type=float, default=1e-6, help="largest relative error accepted")

    board = sub.add_parser("tensorboard", help="export runs as TensorBoard event files (RUN/tensorboard/) and serve them")
    board.add_argument("runs", nargs="+", metavar="RUN", help="run directories; a live run's new commits are appended")
    board.add_argument("--no-serve", action="store_true", help="export only, do not start TensorBoard")
    board.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: the first free one from 6006)")

    cases = sub.add_parser("cases", help="list built-in suites, or the cases of one")
    cases.add_argument("suite", nargs="?")

    sub.add_parser("schema", help="print the JSON schema of a suite file (docs/suite.schema.json)")
    logs = sub.add_parser("logs", help="a case's own output (TensorFlow and the like), kept in RUN/logs")
    logs.add_argument("run")
    logs.add_argument("case", help="case name (or id)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else argv
        if not argv:  # `bplab` alone: what it can do, not argparse's "required: command"
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            raise UserError(f"give a command: {', '.join(commands)} (bplab COMMAND --help for its options)")
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"bplab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bplab: interrupted", file=sys.stderr)
        return 130



def exit_now(code: int) -> None:
    """End the process with `code` once main() is done: Ray is shut down if a command left it
    connected, the output flushed, and the interpreter's teardown skipped. pyarrow's thread
    pools can abort a process during that teardown ("terminate called without an active
    exception", exit -6; apache/arrow#34314), which would turn a one-line refusal (exit 2) or a
    finished run into a crash; everything bplab writes is on disk before main() returns."""
    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            from jobs.study import shutdown

            shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def entry() -> None:
    """The `bplab` command and `python -m jobs`."""
    try:
        code = main()
    except BrokenPipeError:  # `bplab cases | head`: the reader has gone, and nothing is lost
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the last flush must not raise again
        code = 141  # 128 + SIGPIPE, as a command killed by the broken pipe would
    exit_now(code)


# ---------------------------------------------------------------------- commands


def cmd_cases(args) -> int:
    from jobs import suites

    if not args.suite:
        names = suites.builtin_names()
        width = max(map(len, names), default=0)  # the columns stay aligned whatever the longest name
        for name in names:
            suite = suites.load_suite(name)
            print(f"{name:<{width}} {len(suite.cases):>3} cases  {textwrap.shorten(suite.description, 90, placeholder=' ...')}")
        return 0
    suite = suites.load_suite(args.suite)
    default = suite.cases[0].settings.flat()
    varying = [k for k in default if any(c.settings.flat()[k] != default[k] for c in suite.cases)]
    print(f"{suite.name}: {suite.description}")
    width = max((len(case.name) for case in suite.cases), default=0)
    for case in suite.cases:
        flat = case.settings.flat()
        print(f"  {case.name:<{width}}  " + "  ".join(f"{k}={flat[k]}" for k in varying))
    print("shared: " + "  ".join(f"{k}={v}" for k, v in default.items() if k not in varying and v not in (None, "", "[]")))
    return 0


def cmd_plan(args) -> int:
    from jobs import plan as plan_module, suites

    if args.suite is None:
        raise UserError(missing_suite("plan", args.only))
    from_arguments(args, PLAN_OPTIONS)  # the checks `bplab run` makes of the same options
    suite = suites.select(suites.load_suite(args.suite, args.overrides), args.only)
    plan_module.check_request(args.cpus_per_case, args.gpus_per_case)
    if args.address:  # data, node types and fit as the cluster sees them, from its head
        from jobs.study import connect, project_runtime_env, shutdown

        connect(args.address, runtime_env=project_runtime_env())
        try:
            view = plan_module.ray_view(args.address)
            datasets = plan_module.load_data_on_head(suite.cases)
        finally:
            shutdown()
    else:
        view = plan_module.cluster_yaml_view()
        datasets = plan_module.load_data(suite.cases)
    planned = plan_module.make_plan(suite, datasets, cpus_per_case=args.cpus_per_case, gpus_per_case=0.0)
    plan_module.apply_resources(planned, view, args.gpus_per_case)
    print(plan_module.format_plan(planned, view))
    where = f" on {view.host} (the head)" if view.host else ""
    for spec, data in datasets.items():
        print(f"data {spec.name}{where}: train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}, "
              f"fingerprint {data.fingerprint[:16]}")
    return 0


def cmd_fetch(args) -> int:
    from jobs.cluster import fetch_run
    from jobs.study import connect, project_runtime_env, shutdown

    connect(args.address, runtime_env=project_runtime_env())
    try:
        local = fetch_run(args.run, args.dest)
    except (FileNotFoundError, FileExistsError) as error:
        raise UserError(f"fetch: {_one_line(error)}") from None
    finally:
        shutdown()
    print(local)
    return 0


def cmd_run(args) -> int:
    from jobs.study import Study

    return Study(from_arguments(args), command=sys.argv).run().exit_code


def cmd_status(args) -> int:
    import dataclasses

    from analysis.rundir import ENDED, RunDir
    from analysis.rundir.liveness import display_state, driver_liveness, interrupted_line, when
    from jobs.driver import CaseState, render_losses, render_view
    from jobs.plan import PlannedCase
    from jobs.study import case_from_row

    run = RunDir.open(args.run)
    unrepaired = _verify_and_repair(run)
    table = run.cases().set_index("case_id")
    manifest = run.manifest()
    ledger = run.ledger()
    liveness = driver_liveness(run, [entry.updated_at for entry in ledger.values()])
    states = []
    for case_id, entry in ledger.items():
        row = table.loc[case_id]
        case = case_from_row({**row.to_dict(), "case_id": case_id})
        planned = PlannedCase(case, case_id, row.get("num_cpus", 0), row.get("num_gpus", 0), 0,
                              int(row.get("steps_total", 0)), case.settings.data)
        shown = display_state(entry, liveness)  # 'running' with no driver alive is 'interrupted'
        states.append(CaseState(planned, dataclasses.replace(entry, state=shown) if shown != entry.state else entry))
    print(f"run {run.location} (suite {manifest.get('suite')}, commit {str(manifest.get('git_commit'))[:10]})")
    print(render_view(states))
    for state in states:
        if state.entry.reason and state.entry.state != "done":
            print(f"  {state.planned.name}: {state.entry.reason_class}: {state.entry.reason}")
    for line in render_losses(states):
        print(line)
    unfinished = sum(state.entry.state not in ENDED for state in states)
    line = interrupted_line(run.location, liveness, unfinished)
    if line:
        print(line)
    elif liveness.alive:
        print(f"driver: {liveness.who()}, last seen {when(liveness.last_seen)}")
    return 1 if unrepaired else 0


def _verify_and_repair(run) -> bool:
    """Check the run's committed files against its ledger; when damaged and no driver holds the
    run, roll the damaged cases back to their last intact commit. True if damage remains."""
    import platform

    from analysis.rundir import StorageError

    damage = run.verify()
    if not damage:
        return False
    token = f"status:{platform.node()}:{os.getpid()}:{os.urandom(4).hex()}"
    try:
        run.take_lease(token)
    except StorageError as error:
        for _, _, what in damage:
            print(f"damaged: {what} (not repaired: {_one_line(error)})")
        return True
    try:
        for note in run.recover():
            print(f"repaired: {note}")
    finally:
        run.release_lease(token)
    return bool(run.verify())


def cmd_report(args) -> int:
    import pyarrow as pa

    from analysis.report import Progress, ReportError, default_report_dir, write_report
    from analysis.rundir import RunDir, StorageError
    from jobs.study import check_out

    runs = [RunDir.open(run) for run in args.runs]  # a one-line error if one is not a run
    out = Path(args.out) if args.out else default_report_dir(args.runs, args.baseline)
    check_out(str(out))
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--out {out}: {blocked} is a file, not a folder")
    for run in runs:
        damage = run.verify(checkpoints=False, ledger=False)
        if damage:
            raise StorageError(f"{run.location}: {damage[0][2]}; `bplab status {run.location}` repairs it "
                               "(the case goes back to its last intact commit)")
    try:
        path = write_report(args.runs if len(args.runs) > 1 else args.runs[0], out_dir=out, baseline=args.baseline,
                            progress=Progress(sys.stderr))
    except ReportError as error:
        raise UserError(f"report: {error}") from None
    except (OSError, ValueError, pa.ArrowException) as error:  # a damaged run: one line, never a traceback
        raise StorageError(f"report: {type(error).__name__}: {_one_line(error)[:300]}") from None
    print(path)
    return 0


def cmd_runs(args) -> int:
    from analysis.rundir import StorageError
    from analysis.runs import format_runs, list_runs

    try:
        infos = list_runs(args.folder)
    except StorageError as error:
        raise UserError(f"runs: {_one_line(error)}") from None
    print(format_runs(infos))
    return 0


def cmd_gradcheck(args) -> int:
    from workers import gradcheck

    if not (args.tolerance >= 0 and args.tolerance != float("inf")):  # nan fails this too
        raise UserError(f"gradcheck: --tolerance {args.tolerance:g}: must be a finite number >= 0")
    names = list(gradcheck.CHECK_CONFIGS) if args.model == "all" else [args.model]
    for name in names:
        if name not in gradcheck.CHECK_CONFIGS:
            raise UserError(f"gradcheck: unknown model {name!r}; expected all or one of {', '.join(gradcheck.CHECK_CONFIGS)}")
    with _native_stderr_held() as held:  # TensorFlow's start-up lines; shown only if the check crashes
        try:
            return gradcheck.main(names, tolerance=args.tolerance)
        except BaseException:
            held.show = True
            raise


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what is written to fd 2 (TensorFlow's C++ and absl lines, which bypass sys.stderr
    and TF_CPP_MIN_LOG_LEVEL) in a temporary file; write it out at the end if `held.show`."""
    import tempfile
    import types

    held = types.SimpleNamespace(show=False)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.show:
                spool.seek(0)
                sys.stderr.write(spool.read().decode(errors="replace"))
                sys.stderr.flush()


def cmd_schema(args) -> int:
    from workers.settings import suite_schema

    print(json.dumps(suite_schema(), indent=2))
    return 0


def cmd_logs(args) -> int:
    from analysis.rundir import ENDED, RunDir
    from workers.logs import read_case_log

    run = RunDir.open(args.run)
    table = run.cases()
    names = dict(zip(table["case_id"], table["name"]))
    name = names.get(args.case, args.case)
    if name not in names.values():
        shown = ", ".join(list(names.values())[:8])
        raise UserError(f"logs: no case {args.case!r} in {run.location} (cases: {shown}{', ...' if len(names) > 8 else ''})")
    text = read_case_log(run, name)
    if text is None:
        case_id = next(cid for cid, n in names.items() if n == name)
        try:
            ended = run.entry(case_id).state in ENDED
        except (OSError, ValueError, KeyError):
            ended = False
        if ended:  # a worker's TensorFlow start-up lines go to the first case it runs
            print(f"bplab: case {name} printed nothing ({run.log_path(name)} was never written; a worker's "
                  "TensorFlow start-up lines are in the log of the first case it ran)", file=sys.stderr)
        else:
            print(f"bplab: case {name} has no output in {run.log_path(name)} yet", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


COMMANDS = {"schema": cmd_schema, "logs": cmd_logs, "run": cmd_run, "plan": cmd_plan, "fetch": cmd_fetch, "status": cmd_status, "report": cmd_report, "runs": cmd_runs, "gradcheck": cmd_gradcheck, "cases": cmd_cases}


def cmd_tensorboard(args) -> int:
    from analysis.tensorboard import command

    return command(args.runs, serve=not args.no_serve, port=args.port)


COMMANDS["tensorboard"] = cmd_tensorboard
