"""Shared test settings: quiet TensorFlow, the project root on sys.path."""

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A background job of a non-interactive shell (`bash -c 'python -m pytest' &`, nohup-style CI
# launchers) starts with SIGINT ignored, and every process it starts inherits that: a bplab
# started by a test would then never see the Ctrl-C the tests send it. The tests run as from a
# terminal whoever starts them: a handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(session, config, items):
    """The slow tests first, in their file order: run in parallel (pytest -n 2), the long ones
    start early instead of leaving one worker busy alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
