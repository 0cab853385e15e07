"""Each case's own output (TensorFlow, absl, CUDA loader messages) goes to RUN/logs/<case>.log,
never to the user's terminal.

Worker side: `start_capture()` points the process's fd 1 and 2 at a file of its own (before
TensorFlow is imported, whose C++ logging writes to fd 2 directly); `output_offset()` marks
where a case starts; `case_output_since(offset)` returns what was written since, which the
worker ships to the driver with its reports (workers may be on other nodes, and the driver is
the only writer of the run directory). Driver side: `CaseLogs` appends it to RUN/logs/<case>.log,
a plain text file outside the commit protocol, and keeps at most MAX_CASE_LOG_BYTES of it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

MAX_CASE_LOG_BYTES = 1 << 20  # per case: the log keeps its last megabyte
_capture_path: str | None = None


def start_capture(directory: str | None = None) -> str:
    """Send this process's fd 1 and 2 (and sys.stdout/sys.stderr) to a file; return its path.

    Called once per worker process, before TensorFlow is imported; later calls return the
    same file."""
    global _capture_path
    if _capture_path is not None:
        return _capture_path
    directory = directory or os.path.join(tempfile.gettempdir(), "bplab-worker-logs")
    os.makedirs(directory, exist_ok=True)
    _remove_old(directory)
    path = os.path.join(directory, f"worker-{os.getpid()}-{int(time.time() * 1000)}.log")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Python's own streams: line-buffered onto the new fds, so prints and tracebacks land in order
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    _capture_path = path
    return path


def _remove_old(directory: str, days: float = 2.0) -> None:
    """Capture files of workers long gone (a killed worker cannot remove its own)."""
    cutoff = time.time() - days * 86400
    try:
        for entry in os.scandir(directory):
            if entry.name.startswith("worker-") and entry.stat().st_mtime < cutoff:
                os.remove(entry.path)
    except OSError:
        pass


def output_offset() -> int:
    """Where the captured output ends now (0 when nothing is captured)."""
    if _capture_path is None:
        return 0
    _flush()
    try:
        return os.path.getsize(_capture_path)
    except OSError:
        return 0


def case_output_since(offset: int, limit: int = MAX_CASE_LOG_BYTES) -> tuple[str, int]:
    """(text written since `offset`, the new offset); at most `limit` bytes, the tail kept."""
    if _capture_path is None:
        return "", offset
    _flush()
    try:
        with open(_capture_path, "rb") as file:
            end = file.seek(0, os.SEEK_END)
            if end <= offset:
                return "", end
            start = max(offset, end - limit)
            file.seek(start)
            data = file.read(end - start)
    except OSError:
        return "", offset
    text = data.decode("utf-8", errors="replace")
    if start > offset:
        text = f"[... {start - offset} bytes of output dropped ...]\n" + text
    return text, end


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------------- driver side


class CaseLogs:
    """Appends shipped output to RUN/logs/<case>.log (the driver's side; local or pyarrow.fs).
    A log above twice the limit is cut back to its last `limit` bytes."""

    def __init__(self, run, limit: int = MAX_CASE_LOG_BYTES):
        self.run = run
        self.limit = limit
        self._started: set[str] = set()
        self._tails: dict[str, list[str]] = {}
        self._sizes: dict[str, int] = {}

    def path(self, name: str) -> str:
        return self.run.log_path(name)

    def append(self, name: str, text: str) -> None:
        """Add `text` to the case's log; never raises (a log is worth less than the run)."""
        if not text:
            return
        if name not in self._started:  # one header per driver session: resumed runs append
            self._started.add(name)
            text = f"===== bplab: output of case {name}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n" + text
        lines = self._tails.setdefault(name, [])
        lines.extend(line for line in text.splitlines() if line.strip() and not line.startswith("===== bplab:"))
        del lines[:-50]
        try:
            self._write(name, text.encode("utf-8", errors="replace"))
        except Exception:  # noqa: BLE001 - a lost log line never stops the study
            pass

    def _write(self, name: str, data: bytes) -> None:
        fs, path = self.run.filesystem, self.path(name)
        if name not in self._sizes:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            info = fs.get_file_info(path)
            self._sizes[name] = info.size if info.type.name == "File" else 0
        size = self._sizes[name] + len(data)
        if size <= 2 * self.limit:
            try:
                with fs.open_append_stream(path) as out:
                    out.write(data)
                self._sizes[name] = size
                return
            except (NotImplementedError, OSError):  # object stores cannot append: rewrite below
                pass
        old = fs.open_input_stream(path).read() if self._sizes[name] else b""
        data = (old + data)[-self.limit:]
        with fs.open_output_stream(path) as out:
            out.write(data)
        self._sizes[name] = len(data)

    def tail(self, name: str, lines: int = 8) -> list[str]:
        """The last lines this driver received for the case (for a failure's message)."""
        return self._tails.get(name, [])[-lines:]


def read_case_log(run, name: str) -> str | None:
    """The text of RUN/logs/<name>.log, or None when the case wrote none."""
    fs, path = run.filesystem, run.log_path(name)
    try:
        if fs.get_file_info(path).type.name != "File":
            return None
        return fs.open_input_stream(path).read().decode("utf-8", errors="replace")
    except OSError:
        return None
