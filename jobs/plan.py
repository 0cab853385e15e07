"""Planning a study: cases with ids, resources, data, step estimates, and the check that
every resource request fits some node (of the connected cluster, or of cluster.yaml).
Runs in the driver: no TensorFlow here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.suites import Case, Suite

ROOT = Path(__file__).resolve().parents[1]


class PlanError(ValueError):
    """A user-facing planning error (one line)."""


@dataclass
class PlannedCase:
    case: Case
    case_id: str
    num_cpus: float
    num_gpus: float
    steps_per_epoch: int
    steps_total: int
    data_key: object  # the DataSpec: cases with equal specs share one copy in the object store
    data_identity: dict | None = None  # workers.data.identify(): official or not, file digests

    @property
    def name(self) -> str:
        return self.case.name

    def row(self) -> dict:
        """The cases-table row: ids, resources and every setting."""
        import json

        return {"case_id": self.case_id, "name": self.case.name, "group": self.case.group,
                "num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "steps_total": self.steps_total,
                "settings_json": json.dumps(self.case.settings.to_dict(), default=list), **self.case.settings.flat(),
                **_data_columns(self.data_identity)}


def _data_columns(identity: dict | None) -> dict:
    """Which data a case trained on, for the cases table: official or not, and the files' digest."""
    identity = identity or {}
    return {"data_official": identity.get("official"), "data_digest": identity.get("digest"),
            "data_reason": identity.get("reason")}


def load_data(cases) -> dict:
    """DataSpec -> Dataset, each distinct spec loaded once (raises workers.data.DataError)."""
    from workers.data import load_dataset

    datasets = {}
    for case in cases:
        spec = case.settings.data
        if spec not in datasets:
            datasets[spec] = load_dataset(spec)
    return datasets


def make_plan(suite: Suite, datasets: dict, *, cpus_per_case: float, gpus_per_case: float) -> list[PlannedCase]:
    from workers.trainer import batch_plan

    if cpus_per_case <= 0:
        raise PlanError(f"--cpus-per-case {cpus_per_case}: must be > 0")
    if gpus_per_case < 0:
        raise PlanError(f"--gpus-per-case {gpus_per_case}: must be >= 0")
    if gpus_per_case > 1 and gpus_per_case != int(gpus_per_case):
        raise PlanError(f"--gpus-per-case {gpus_per_case}: above 1 it must be a whole number")
    from workers import models, schedules
    from workers.settings import SettingsError

    planned = []
    for case in suite.cases:
        data = datasets[case.settings.data]
        try:  # the model at this data's shape, built without TensorFlow: shape errors now, not in an actor
            model = models.build_model(case.settings, data.x_train.shape[1:], data.num_classes)
            if any(dim <= 0 for shape in model.output_shapes() for dim in shape):
                raise SettingsError(f"{case.settings.model} on inputs {model.input_shape}: a layer's output is empty "
                                    f"{model.output_shapes()}")
            schedules.check_fits(case.settings, model)
        except SettingsError as error:
            raise PlanError(f"case {case.name}: {error}") from None
        _, steps = batch_plan(case.settings, len(data.x_train))
        planned.append(PlannedCase(case, case.case_id(data.fingerprint), cpus_per_case, gpus_per_case, steps,
                                   steps * case.settings.epochs, case.settings.data, getattr(data, "identity", None)))
    ids = [p.case_id for p in planned]
    assert len(set(ids)) == len(ids), "case ids collide"
    return planned


# ---------------------------------------------------------------------- resources


def cluster_yaml_nodes(path: Path = ROOT / "cluster.yaml") -> list[dict]:
    """[{'name', 'CPU', 'GPU'}] per node the cluster-launcher file can bring up at most
    (the head once, each worker type max_workers times)."""
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    head = config.get("head_node_type")
    nodes = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources = node_type.get("resources") or {}
        count = 1 if name == head else int(node_type.get("max_workers", config.get("max_workers", 0)) or 0)
        for index in range(count):
            nodes.append({"name": f"{path.name}:{name}#{index}", "CPU": float(resources.get("CPU", 0)),
                          "GPU": float(resources.get("GPU", 0))})
    return nodes


def ray_nodes() -> list[dict]:
    """[{'name', 'CPU', 'GPU'}] per alive node of the connected Ray cluster."""
    import ray

    nodes = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            nodes.append({"name": node.get("NodeManagerAddress", "?") + ":" + node["NodeID"][:8],
                          "CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))})
    return nodes


def check_fits(planned: list[PlannedCase], nodes: list[dict], where: str) -> None:
    """PlanError unless every case's request fits on at least one node."""
    if not nodes:
        return
    for case in planned:
        if not any(n["CPU"] >= case.num_cpus and n["GPU"] >= case.num_gpus for n in nodes):
            most_gpus = max(n["GPU"] for n in nodes)
            most_cpus = max(n["CPU"] for n in nodes)
            raise PlanError(
                f"case {case.name}: asks for {case.num_gpus:g} GPU and {case.num_cpus:g} CPU per case, but no node of "
                f"{where} has that (largest: {most_gpus:g} GPU, {most_cpus:g} CPU)")


def parallel_slots(planned: list[PlannedCase], nodes: list[dict]) -> int:
    """How many of the cases can run at once on these nodes (greedy, per node)."""
    if not planned or not nodes:
        return 0
    request = planned[0]
    total = 0
    for node in nodes:
        by_cpu = math.floor(node["CPU"] / request.num_cpus + 1e-9)
        by_gpu = math.floor(node["GPU"] / request.num_gpus + 1e-9) if request.num_gpus else by_cpu
        total += min(by_cpu, by_gpu)
    return total


def format_plan(planned: list[PlannedCase], nodes: list[dict], where: str) -> str:
    lines = [f"{'case':<24} {'id':<24} {'schedule':<20} {'data':<8} {'CPU':>4} {'GPU':>4} {'steps':>8}"]
    for p in planned:
        s = p.case.settings
        lines.append(f"{p.name:<24} {p.case_id:<24} {s.schedule:<20} {s.data.name:<8} {p.num_cpus:>4g} {p.num_gpus:>4g} {p.steps_total:>8}")
    total = sum(p.steps_total for p in planned)
    slots = parallel_slots(planned, nodes)
    lines.append(f"{len(planned)} cases, {total} training steps in all; "
                 + (f"{slots} can run at once on {where} ({len(nodes)} node(s))" if nodes else "no cluster to check against"))
    return "\n".join(lines)
