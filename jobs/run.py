"""Entry point for `ray submit cluster.yaml jobs/run.py -- SUITE [options]`.

Runs on the head node inside the cluster, so it connects to that cluster (--address auto)
unless an address is given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when not installed

from jobs.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = ["run", *sys.argv[1:]]
    if not any(arg == "--address" or arg.startswith("--address=") for arg in argv):
        argv += ["--address", "auto"]
    sys.exit(main(argv))
