"""Entry point for `ray submit cluster.yaml jobs/run.py -- SUITE [options]`.

`ray submit` uploads this one file to the head (as ~/run.py) and runs it there; the project
itself is the copy `ray up` synced to ~/bplab (cluster.yaml's file_mounts). So this script runs
that copy (or $BPLAB_HOME, or the checkout it sits in when run from one), connects to the
cluster it runs in (--address auto unless given) and writes the run under ~/bplab-runs on the
head ($BPLAB_RUNS, or --out), which it prints. The manifest records the digest of the source
files that ran.
"""

import os
import sys
from pathlib import Path


def project_root() -> Path:
    """The bplab copy to run: $BPLAB_HOME, the checkout this file is in, or ~/bplab."""
    if os.environ.get("BPLAB_HOME"):
        return Path(os.environ["BPLAB_HOME"]).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "jobs" / "cli.py").is_file() and (here / "workers").is_dir():
        return here
    return (Path.home() / "bplab").resolve()


def main(argv: list[str]) -> int:
    root = project_root()
    if not (root / "jobs" / "cli.py").is_file():
        print(f"bplab: error: no bplab project at {root} (run `ray up cluster.yaml` to sync it, or set BPLAB_HOME)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))  # before any installed copy
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("BPLAB_RUNS", str(Path.home() / "bplab-runs"))
    from jobs.cli import main as cli_main

    argv = ["run", *argv]
    if not any(arg == "--address" or arg.startswith("--address=") for arg in argv):
        argv += ["--address", "auto"]
    print(f"[bplab] project {root}; runs go to {os.environ['BPLAB_RUNS']} unless --out is given", file=sys.stderr)
    return cli_main(argv)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "jobs.cli" in sys.modules:  # found the project: end as `bplab` does (jobs.cli.exit_now)
        sys.modules["jobs.cli"].exit_now(code)
    sys.exit(code)
