"""`python -m jobs ...` is `bplab ...`."""

from jobs.cli import entry

entry()
