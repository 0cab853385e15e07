"""What a Ray cluster can run, asked of the cluster itself, and the work bplab does on its head.

A cluster started by `ray up cluster.yaml` (or `ray start --head --autoscaling-config=FILE`)
starts with the head alone; its GPU workers exist only once the autoscaler launches them. So
the node types come from the autoscaler's configuration, read on the head: the file the
autoscaler process of this cluster was started with (`ray up` uploads it as
~/ray_bootstrap_config.yaml), or the configuration the autoscaler reports to the GCS
(autoscaler v2, KubeRay).

Node types that declare the custom resource `bplab_trainer` train; the others (the head in
cluster.yaml) never do: every case asks for a sliver of it. A cluster whose configuration
declares it nowhere trains on every node, as does local Ray.

Functions named `head_*` run as Ray tasks pinned to the head node (0 CPU), so the laptop can
ask about data and runs that live on the cluster. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import os
import platform
import tarfile
import tempfile
from pathlib import Path

import yaml

TRAINER_RESOURCE = "bplab_trainer"
TRAINER_SHARE = 0.001  # per case: the node's CPUs and GPUs, not this, bound how many cases it holds
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head declares it
CHUNK_BYTES = 8 << 20  # a fetched run travels in pieces of this size


# ---------------------------------------------------------------------- node types


def node_types_from_config(config: dict, source: str) -> list[dict]:
    """One dict per node type of an autoscaler / cluster-launcher config:
    {'name', 'CPU', 'GPU', 'resources', 'max', 'head', 'source'}; 'max' is how many nodes of
    the type the cluster can have at once (the head 1; workers their max_workers, within the
    cluster's max_workers)."""
    head = config.get("head_node_type")
    left = int(config.get("max_workers", 0) or 0)
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:
            count = 1
        else:
            count = int(spec.get("max_workers", left) or 0)
            count, left = min(count, left), left - min(count, left)
        types.append({"name": str(name), "CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0),
                      "resources": resources, "max": count, "head": name == head, "source": source})
    return types


def read_config(path: str | os.PathLike) -> dict:
    return yaml.safe_load(Path(path).expanduser().read_text()) or {}


def autoscaler_config_path(gcs_address: str) -> str | None:
    """The --autoscaling-config of the autoscaler (monitor.py) serving this GCS, if it runs on
    this machine (it runs on the head)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    port = gcs_address.rsplit(":", 1)[-1]
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        gcs = next((a.split("=", 1)[1] for a in args if a.startswith("--gcs-address=")), "")
        config = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if config and gcs.rsplit(":", 1)[-1] == port and Path(config).expanduser().is_file():
            return str(Path(config).expanduser())
    return None


def _gcs_cluster_config() -> list[dict] | None:
    """Node types the autoscaler reported to the GCS (autoscaler v2, KubeRay); None if none."""
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: fall back to the file
        return None
    if not config or not config.node_group_configs:
        return None
    types = []
    for group in config.node_group_configs:
        resources = {k: float(v) for k, v in group.resources.items()}
        types.append({"name": group.name, "CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0),
                      "resources": resources, "max": int(group.max_count) if group.max_count >= 0 else 1 << 20,
                      "head": False, "source": "the GCS's cluster config"})
    return types


def head_info(gcs_address: str) -> dict:
    """Runs on the head: its hostname and the node types its autoscaler can launch (or None)."""
    types = _gcs_cluster_config()
    if types is None:
        path = autoscaler_config_path(gcs_address)
        if path:
            types = node_types_from_config(read_config(path), path)
    return {"host": platform.node(), "types": types}


# ---------------------------------------------------------------------- tasks on the head


def on_head(function, *args):
    """Run `function(*args)` as a task on the head node and return its result."""
    import ray

    task = ray.remote(function).options(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_retries=0)
    return ray.get(task.remote(*args))


def head_data_summaries(specs: list) -> list:
    """Runs on the head: each data set loaded where the driver loads it, returned as its shape
    and fingerprint only (not the arrays), or ('error', message) for a data problem."""
    from workers.data import DataError, load_dataset

    out = []
    for spec in specs:
        try:
            data = load_dataset(spec)
        except DataError as error:
            return [("error", str(error))]
        out.append(("ok", {"x_train": tuple(data.x_train.shape), "x_test": tuple(data.x_test.shape),
                           "num_classes": data.num_classes, "fingerprint": data.fingerprint}))
    return out


def head_pack_run(run: str) -> tuple[str | None, int | str]:
    """Runs on the head: the run directory as a .tar.gz in a temporary file; (path, size), or
    (None, why) when there is no run there."""
    path = Path(run).expanduser()
    if not path.is_absolute():
        path = Path.home() / path
    from analysis.rundir import RunDir

    if not RunDir(str(path)).is_run():
        return None, f"{path} on {platform.node()} is not a bplab run"
    handle, archive = tempfile.mkstemp(prefix="bplab-fetch-", suffix=".tar.gz")
    os.close(handle)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(str(path), arcname=path.name)
    return archive, os.path.getsize(archive)


def head_read_chunk(archive: str, offset: int, size: int) -> bytes:
    with open(archive, "rb") as f:
        f.seek(offset)
        return f.read(size)


def head_remove(archive: str) -> None:
    Path(archive).unlink(missing_ok=True)


def fetch_run(run: str, dest: str | os.PathLike) -> Path:
    """Bring run directory `run` (a path on the head; relative to the head's home) to `dest`
    in chunks of CHUNK_BYTES; returns the local run directory."""
    dest = Path(dest)
    archive, size = on_head(head_pack_run, run)
    if archive is None:
        raise FileNotFoundError(size)
    buffer = io.BytesIO()
    try:
        for offset in range(0, size, CHUNK_BYTES):
            buffer.write(on_head(head_read_chunk, archive, offset, CHUNK_BYTES))
    finally:
        on_head(head_remove, archive)
    assert buffer.tell() == size, f"fetched {buffer.tell()} of {size} bytes"
    buffer.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=buffer, mode="r:gz") as tar:
        names = tar.getnames()
        top = names[0].split("/", 1)[0] if names else ""
        if (dest / top).exists():
            raise FileExistsError(f"{dest / top} already exists: fetch into another folder")
        tar.extractall(dest, filter="data")
    return dest / top
