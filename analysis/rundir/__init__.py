"""The run directory: its layout, the commit protocol, the lease, repair and the readers' view.

Everything that knows a file name of a run lives in this package; ``jobs/`` (the driver,
``bplab status``) and the rest of ``analysis/`` (``analysis.load``, ``bplab runs``,
``bplab tensorboard``) go through it. It imports nothing from ``jobs/`` or the rest of
``analysis/`` (tests/test_imports.py checks), only ``workers.errors`` and ``workers.settings``.

    layout.py   every file and folder name, the datasets, the format version
    files.py    pyarrow.fs primitives: URI check, atomic writes, fsync, exclusive create
    ledger.py   LedgerEntry, reading an entry with its backup copy
    schema.py   Arrow schema evolution of the datasets, the typed cases table
    commit.py   the exactly-once commit protocol, per-case files, the metrics read cache
    lease.py    the driver's lease (driver.lock)
    repair.py   verify, recover, roll back
    legacy.py   the one place that reads older run formats
    run.py      RunDir, put together from the above

    from analysis.rundir import RunDir
    run = RunDir.open("runs/quick")                 # or "s3://bucket/runs/quick"
    run.ledger()["c0ffee"].state                    # 'done'
    run.read_case("metrics", "c0ffee")              # its committed rows (pyarrow.Table)
"""

from analysis.rundir.errors import LeaseLost, StorageError
from analysis.rundir.files import child, is_uri, local_path, resolve, subfolders
from analysis.rundir.layout import DATASETS, FORMAT_VERSION, Dataset
from analysis.rundir.lease import LEASE_STALE_SECONDS
from analysis.rundir.ledger import CASE_STATES, ENDED, FAILURE_CLASSES, FINISHED, LedgerEntry
from analysis.rundir.run import RunDir

__all__ = [
    "RunDir", "LedgerEntry", "StorageError", "LeaseLost", "DATASETS", "Dataset", "FORMAT_VERSION",
    "CASE_STATES", "FAILURE_CLASSES", "FINISHED", "ENDED", "LEASE_STALE_SECONDS", "is_uri", "local_path", "resolve",
    "child", "subfolders",
]
