"""Helpers for tests that start their own Ray head with `ray start`: free ports, bounded
commands, and ending only the processes of that head.

`ray stop` cannot be scoped: it matches Ray's process names machine-wide and would end other
people's clusters. So a test ends the processes whose command line names its private temp
dir or GCS address, or whose environment holds its private HOME (Ray workers rename
themselves to ``ray::...``; the fake autoscaler's worker nodes are started by the head's
autoscaler and inherit that HOME), and all their descendants, by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent  # `ray` and `bplab` of this environment (no pyenv shim lookup through HOME)
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):  # all open at once, so the ports are distinct
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run(cmd, env, timeout, cwd=None) -> subprocess.CompletedProcess:
    """Run a command bounded by `timeout`; stdout and stderr together in .stdout."""
    try:
        return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-4000:]}")


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def private_env(home: Path, **extra) -> dict:
    """This environment without the caller's Ray address and auth settings, HOME private, token auth on."""
    env = {k: v for k, v in os.environ.items()
           if k not in AUTH_VARS and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    })
    return env


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, environment), from /proc (zombies left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().replace(b"\0", b"\n").decode(errors="replace")
            except OSError:
                environ = ""
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), cmdline, "\n" + environ)
    return table


def head_pids(tags: list[str], home: Path) -> set[int]:
    """The head's processes: a command line containing one of `tags`, or the private HOME in the
    environment, and all their descendants (never this test process or its ancestors)."""
    table = _procs()
    mine = {os.getpid()}
    pid = os.getpid()
    while pid in table and table[pid][0] not in (0, pid):
        pid = table[pid][0]
        mine.add(pid)
    home_var = f"\nHOME={home}\n"
    found = {p for p, (_, cmd, environ) in table.items()
             if any(tag in cmd for tag in tags) or home_var in environ + "\n"}
    grew = True
    while grew:
        children = {p for p, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found - mine


def end_processes(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` s (gcs_server and raylet take ~10 s to exit on SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
            if not pids:
                return
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, ValueError, IndexError):
        return True


def make_token(env: dict, home: Path) -> str:
    """The README's token step, as written: owner-only token file in the private HOME."""
    gen = run(["bash", "-c", "(umask 077; ray get-auth-token --generate) && chmod 600 ~/.ray/auth_token"], env, 60)
    assert gen.returncode == 0, tail(gen.stdout)
    token_file = home / ".ray" / "auth_token"
    assert token_file.is_file() and token_file.read_text().strip(), "no token written to the private HOME"
    assert token_file.stat().st_mode & 0o777 == 0o600, oct(token_file.stat().st_mode)
    return token_file.read_text().strip()


def start_head(env: dict, temp_dir: Path, ports: list[int], num_cpus: int, *extra: str) -> None:
    """`ray start --head` on 127.0.0.1 with the four `ports` (GCS, dashboard, Ray Client,
    dashboard agent) and the dashboard on: the Jobs API needs it. Fails the test if it fails."""
    gcs_port, dashboard_port, client_port, agent_port = ports
    start = run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
                 f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats",
                 f"--temp-dir={temp_dir}", *extra], env, 180)
    assert start.returncode == 0, tail(start.stdout)


def end_head(tags: list[str], home: Path, base: Path) -> None:
    """End a head started by start_head (by pid, never `ray stop`), remove `base`, and fail the
    test if one of its processes is still running."""
    end_processes(head_pids(tags, home))
    left = head_pids(tags, home)
    shutil.rmtree(base, ignore_errors=True)
    assert not left, f"Ray processes of the test head still running: {sorted(left)}"


def autoscaling_config(gcs_port: int, gpus: int = 1, cpus: int = 1, max_workers: int = 2) -> dict:
    """Ray's fake multi-node provider as a cold cluster: the head alone (0 GPU), `gpu_worker`
    nodes (`gpus` GPUs, `cpus` CPUs, the bplab_trainer marker) only when the autoscaler
    launches them, at most `max_workers`."""
    empty = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                 "cluster_synced_files")}
    return {
        "cluster_name": "bplab-fake",
        "max_workers": max_workers,
        "idle_timeout_minutes": 5,
        "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": cpus, "GPU": gpus, "bplab_trainer": 1000}, "node_config": {},
                           "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **empty,
    }


@contextmanager
def autoscaling_head(env_extra: dict | None = None, **config):
    """A cold autoscaling cluster (autoscaling_config(**config)), token auth on, in a private
    HOME; yields {base, home, laptop, env, gcs, dashboard}; ended by pid afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bpas-", dir="/tmp"))  # short: Ray's unix socket paths stay < 108 chars
    home, temp_dir, laptop = base / "home", base / "ray", base / "laptop"
    for d in (home, temp_dir, laptop):
        d.mkdir()
    ports = free_ports(4)
    gcs_port, dashboard_port = ports[:2]
    env = private_env(home, RAY_FAKE_CLUSTER="1", **(env_extra or {}))
    config_file = base / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(autoscaling_config(gcs_port, **config)))
    info = {"base": base, "home": home, "laptop": laptop, "env": env, "gcs": f"127.0.0.1:{gcs_port}",
            "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    tags = [str(base), info["gcs"]]
    try:
        make_token(env, home)
        start_head(env, temp_dir, ports, 1, f"--autoscaling-config={config_file}")
        yield info
    finally:
        end_head(tags, home, base)


def fake_node_pids(node_id: str) -> set[int]:
    """Every process of one fake worker node: its raylet and agents carry the node's id in their
    environment (the fake provider sets RAY_OVERRIDE_NODE_ID_FOR_TESTING), its workers are their
    descendants."""
    table = _procs()
    marker = f"\nRAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}\n"
    found = {p for p, (_, _, environ) in table.items() if marker in environ + "\n"}
    grew = True
    while grew:
        children = {p for p, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found - {os.getpid()}


def kill_fake_node(node_id: str) -> int:
    """SIGKILL a whole fake node at once (as a preempted VM vanishes); how many processes."""
    pids = fake_node_pids(node_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)
