"""What the benchmarks record about the machine they ran on (shared by the bench_* scripts)."""

import os
import platform
import subprocess


def cpu_model() -> str:
    """lscpu's model name (or what platform knows)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def uptime() -> str:
    """The `uptime` line (its load averages say how busy the shared machine was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def load1() -> float:
    return os.getloadavg()[0]


def cpu_pressure() -> str:
    """Linux PSI 'some avg10': share of the last 10 s in which a runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as handle:
            return handle.readline().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"
