"""Planning a study: cases with ids, resources, data, step estimates, and the check that
every resource request fits some node (of the connected cluster, or of cluster.yaml).
Runs in the driver: no TensorFlow here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jobs.cluster import HEAD_RESOURCE, TRAINER_RESOURCE, TRAINER_SHARE
from jobs.suites import Case, Suite
from workers.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class PlanError(UserError):
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
    resources: dict = field(default_factory=dict)  # custom Ray resources per case (the training marker)
    data_identity: dict | None = None  # workers.data.identify(): official or not, file digests
    data_fingerprint: str = ""  # the data's content hash, part of the case id

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


class DataSummary:
    """A data set as planning sees it: shapes, classes and fingerprint, not the arrays (for
    data loaded on the cluster's head)."""

    def __init__(self, x_train: tuple, x_test: tuple, num_classes: int, fingerprint: str):
        import numpy as np

        zero = np.zeros((), np.float32)
        self.x_train, self.x_test = np.broadcast_to(zero, x_train), np.broadcast_to(zero, x_test)  # no memory
        self.num_classes, self.fingerprint = num_classes, fingerprint


def load_data_on_head(cases) -> dict:
    """DataSpec -> DataSummary, each data set loaded on the connected cluster's head, where a
    driver submitted as a job loads it (raises workers.data.DataError naming that node)."""
    from jobs.cluster import head_data_summaries, on_head
    from workers.data import DataError

    specs = list(dict.fromkeys(case.settings.data for case in cases))
    results = on_head(head_data_summaries, specs)
    for status, value in results:
        if status == "error":
            raise DataError(value)
    return {spec: DataSummary(**value) for spec, (_, value) in zip(specs, results)}


def check_request(cpus_per_case: float, gpus_per_case: float | None) -> None:
    """PlanError for a resource request no node could ever meet."""
    if cpus_per_case <= 0:
        raise PlanError(f"--cpus-per-case {cpus_per_case}: must be > 0")
    if gpus_per_case is None:
        return
    if gpus_per_case < 0:
        raise PlanError(f"--gpus-per-case {gpus_per_case}: must be >= 0")
    if gpus_per_case > 1 and gpus_per_case != int(gpus_per_case):
        raise PlanError(f"--gpus-per-case {gpus_per_case}: above 1 it must be a whole number")


def make_plan(suite: Suite, datasets: dict, *, cpus_per_case: float, gpus_per_case: float) -> list[PlannedCase]:
    from workers.trainer import batch_plan

    check_request(cpus_per_case, gpus_per_case)
    from workers import models
    from workers.settings import SettingsError

    planned = []
    for case in suite.cases:
        data = datasets[case.settings.data]
        try:  # the model at this data's shape, built without TensorFlow: shape errors now, not in an actor
            model = models.build_model(case.settings, data.x_train.shape[1:], data.num_classes)
            if any(dim <= 0 for shape in model.output_shapes() for dim in shape):
                raise SettingsError(f"{case.settings.model} on inputs {model.input_shape}: a layer's output is empty "
                                    f"{model.output_shapes()}")
            check_schedule_fits(case.settings, model)
        except SettingsError as error:
            raise PlanError(f"case {case.name}: {error}") from None
        _, steps = batch_plan(case.settings, len(data.x_train))
        planned.append(PlannedCase(case, case.case_id(data.fingerprint), cpus_per_case, gpus_per_case, steps,
                                   steps * case.settings.epochs, case.settings.data,
                                   data_identity=getattr(data, "identity", None), data_fingerprint=data.fingerprint))
    ids = [p.case_id for p in planned]
    assert len(set(ids)) == len(ids), "case ids collide"
    return planned


def adopt_stored_ids(planned: list[PlannedCase], rows) -> int:
    """Give each planned case the id an existing run stored for it; returns how many changed.

    A run keeps the ids it was made with (its cases table). A planned case is that run's case
    when the ids are equal, or when a case of the same name has equal settings and its stored
    id is the one the first id scheme gave those stored settings with this data (`legacy_case_id`):
    a run made before ids left out default settings resumes under its own ids. Anything else
    (other settings, other data) is a new case. Linear in the number of cases."""
    import json

    from workers.settings import SettingsError, from_json

    rows = list(rows)
    stored = {row["case_id"] for row in rows}
    by_name = {row["name"]: row for row in rows}
    changed = 0
    for p in planned:
        row = by_name.get(p.name)
        if p.case_id in stored or row is None:
            continue
        try:
            values = json.loads(row["settings_json"])
            same = from_json(values) == p.case.settings
        except (ValueError, TypeError, SettingsError):
            continue
        if same and row["case_id"] == legacy_case_id(p.name, values, p.data_fingerprint):
            p.case_id = row["case_id"]
            changed += 1
    ids = [p.case_id for p in planned]
    assert len(set(ids)) == len(ids), "case ids collide"
    return changed


def legacy_case_id(name: str, settings_json: dict, data_fingerprint: str) -> str:
    """The id the first scheme (every setting hashed, as stored in settings_json) gave a case."""
    import hashlib
    import json

    text = json.dumps({"settings": settings_json, "data": data_fingerprint}, sort_keys=True, default=list)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def check_schedule_fits(settings, model) -> None:
    """SettingsError if the schedule cannot run on this model at this input shape (no
    TensorFlow): the dilated skip needs unit i's output and unit i+1's output to have the
    same channels and a whole-number spatial ratio; a learning rule needs units whose
    weights it can replace in the backward (workers.rules.check_fits)."""
    from workers import rules
    from workers.schedules import dilated_units
    from workers.settings import SettingsError

    reason = rules.check_fits(settings, model)
    if reason is not None:
        raise SettingsError(reason)

    if "dilated" not in settings.schedule:
        return
    shapes = model.output_shapes()
    for index in dilated_units(len(shapes)):
        here, above = shapes[index], shapes[index + 1]
        same_rank = len(here) == len(above)
        fits = same_rank and here[-1] == above[-1] and all(a > 0 and h % a == 0 for h, a in zip(here[:-1], above[:-1]))
        if not fits:
            raise SettingsError(
                f"schedule {settings.schedule}: {model.name} on inputs {model.input_shape} cannot add the gradient of "
                f"{model.units[index + 1].name} {above} to {model.units[index].name} {here} (needs equal channels and "
                "a whole-number upsampling)")


# ---------------------------------------------------------------------- resources
#
# A node dict: {'name', 'CPU', 'GPU', 'resources', 'max', 'head', 'source'}: a node type the
# cluster can launch ('max' of them at once), or an alive node ('max' 1).


@dataclass
class ClusterView:
    """What a study can use: the node types the cluster can launch and the nodes alive now."""

    where: str
    types: list | None  # the configured node types (None: no configuration, the live nodes are all there is)
    live: list  # the alive nodes (empty when not connected)
    autoscaling: bool = False  # the types come from a running autoscaler: ask it for the study's resources
    host: str | None = None  # the head's hostname, when asked

    @property
    def marked(self) -> bool:
        """Some node type (or node) declares the training resource: only those train."""
        return any(n["resources"].get(TRAINER_RESOURCE, 0) > 0 for n in (self.types or []) + self.live)

    def trains(self, node: dict) -> bool:
        return node["resources"].get(TRAINER_RESOURCE, 0) > 0 if self.marked else True

    def trainable(self) -> list:
        """The node shapes a case may be placed on: configured types, else the live nodes."""
        return [n for n in (self.types if self.types is not None else self.live) if self.trains(n)]

    def default_gpus(self) -> float:
        return 1.0 if any(n["GPU"] > 0 for n in self.trainable() + [n for n in self.live if self.trains(n)]) else 0.0

    def case_resources(self) -> dict:
        """Custom resources every case asks for (the training marker, when the cluster has one)."""
        return {TRAINER_RESOURCE: TRAINER_SHARE} if self.marked else {}


def cluster_yaml_view(path: Path = ROOT / "cluster.yaml") -> ClusterView:
    """The node types of the cluster-launcher file (not connected)."""
    from jobs.cluster import node_types_from_config, read_config

    types = node_types_from_config(read_config(path), path.name) if path.is_file() else []
    return ClusterView(path.name, types, [])


def ray_view(address: str | None) -> ClusterView:
    """The connected cluster: its alive nodes and, asked on its head, the node types its
    autoscaler can launch."""
    import ray

    from jobs.cluster import head_info, on_head
    from jobs.options import is_local

    live = ray_nodes()
    if is_local(address):  # a private local Ray: no autoscaler, the local node trains
        return ClusterView("local Ray", None, live)
    where = f"the Ray cluster at {address}"
    info = on_head(head_info, ray.get_runtime_context().gcs_address)
    return ClusterView(where, info["types"], live, autoscaling=info["types"] is not None, host=info["host"])


def ray_nodes() -> list[dict]:
    """One node dict per alive node of the connected Ray cluster."""
    import ray

    nodes = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = {k: float(v) for k, v in node.get("Resources", {}).items()}
            nodes.append({"name": node.get("NodeManagerAddress", "?") + ":" + node["NodeID"][:8],
                          "node_id": node["NodeID"], "CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0),
                          "resources": resources, "max": 1, "head": HEAD_RESOURCE in resources, "source": "alive"})
    return nodes


def _fits(case: PlannedCase, node: dict) -> bool:
    return (node["CPU"] >= case.num_cpus and node["GPU"] >= case.num_gpus
            and all(node["resources"].get(k, 0) >= v for k, v in case.resources.items()))


def check_fits(planned: list[PlannedCase], nodes: list[dict], where: str) -> None:
    """PlanError unless every case's request fits on at least one of `nodes` (node types or
    alive nodes a case may train on)."""
    if not nodes:
        return
    for case in planned:
        if not any(_fits(case, n) for n in nodes):
            most_gpus = max(n["GPU"] for n in nodes)
            most_cpus = max(n["CPU"] for n in nodes)
            raise PlanError(
                f"case {case.name}: asks for {case.num_gpus:g} GPU and {case.num_cpus:g} CPU per case, but no node "
                f"{'type ' if nodes[0].get('source') != 'alive' else ''}of {where} that trains has that "
                f"(largest: {most_gpus:g} GPU, {most_cpus:g} CPU)")


def parallel_slots(planned: list[PlannedCase], nodes: list[dict], cap: bool = True) -> int:
    """How many of the cases can run at once on these nodes (each node type counted 'max' times);
    cap=False: how many cases like them could."""
    if not planned or not nodes:
        return 0
    request = planned[0]
    total = 0
    for node in nodes:
        if not _fits(request, node):
            continue
        by_cpu = math.floor(node["CPU"] / request.num_cpus + 1e-9)
        by_gpu = math.floor(node["GPU"] / request.num_gpus + 1e-9) if request.num_gpus else by_cpu
        total += min(by_cpu, by_gpu) * node.get("max", 1)
    return min(total, len(planned)) if cap else total


def apply_resources(planned: list[PlannedCase], view: ClusterView, gpus_per_case: float | None) -> float:
    """Give every case its GPUs (the given number, or the default for `view`) and the
    training marker; PlanError unless each fits a node that trains. Returns the GPUs per case."""
    gpus = gpus_per_case if gpus_per_case is not None else view.default_gpus()
    for case in planned:
        case.num_gpus = gpus
        case.resources = view.case_resources()
    check_fits(planned, view.trainable(), view.where)
    return gpus


def concurrency(planned: list[PlannedCase], view: ClusterView) -> tuple[int, int | None]:
    """(cases at once when the cluster is fully scaled, cases at once on the nodes alive now or None)."""
    full = parallel_slots(planned, view.trainable())
    now = parallel_slots(planned, [n for n in view.live if view.trains(n)]) if view.live else None
    return full, now


def resource_bundles(planned: list[PlannedCase], count: int) -> list[dict]:
    """What to ask the autoscaler for: one bundle per case that can run at once."""
    if not planned:
        return []
    request = planned[0]
    bundle = {"CPU": request.num_cpus, "GPU": request.num_gpus, **request.resources}
    return [{k: v for k, v in bundle.items() if v}] * count


def describe_concurrency(planned: list[PlannedCase], view: ClusterView) -> str:
    full, now = concurrency(planned, view)
    types = [t for t in view.trainable() if t.get("source") != "alive"]
    slots = parallel_slots(planned, types, cap=False)
    scaled = (f"{full} at once when {view.where} is fully scaled ("
              + ", ".join(f"{t['name']} x{t['max']}" for t in types) + f": {slots} slots)") if types \
        else f"{full} at once on {view.where}"
    return scaled + (f", {now} on the nodes alive now" if now is not None and view.types is not None else "")


def format_plan(planned: list[PlannedCase], view: ClusterView) -> str:
    name_width = max([24, *(len(p.name) for p in planned)])  # columns stay aligned for long names and ids
    id_width = max([24, *(len(p.case_id) for p in planned)])
    lines = [f"{'case':<{name_width}} {'id':<{id_width}} {'schedule':<20} {'data':<8} {'CPU':>4} {'GPU':>4} {'steps':>8}"]
    for p in planned:
        s = p.case.settings
        lines.append(f"{p.name:<{name_width}} {p.case_id:<{id_width}} {s.schedule:<20} {s.data.name:<8} "
                     f"{p.num_cpus:>4g} {p.num_gpus:>4g} {p.steps_total:>8}")
    total = sum(p.steps_total for p in planned)
    lines.append(f"{len(planned)} cases, {total} training steps in all; "
                 + (describe_concurrency(planned, view) if view.trainable() else "no cluster to check against"))
    if view.marked:
        lines.append(f"cases train only on node types that declare the resource {TRAINER_RESOURCE}: "
                     + ", ".join(sorted({n['name'] for n in (view.types or view.live) if view.trains(n)})))
    return "\n".join(lines)
