"""`python -m jobs ...` is `bplab ...`."""

import sys

from jobs.cli import main

sys.exit(main())
