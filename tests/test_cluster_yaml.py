"""Checks of cluster.yaml, the Ray cluster-launcher config (no cloud access needed).

- Ray's own validation, the way `ray up` runs it: prepare_config (merge with the
  provider's defaults, merge setup commands, fill per-type worker limits), then
  validate_config (JSON schema + cross-field checks). validate_config alone
  rejects a hand-written file, because fields such as cluster_synced_files only
  exist after prepare_config.
- The structure bplab relies on: CPU-only head (GPU 0), GPU worker type(s),
  project mounted at ~/bplab and pip-installed on every node.
- Every mapping key has a comment (inline, or a comment block directly above).
- Token authentication stays on everywhere.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)  # per test; a test's own mark wins

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
AMI_NOTE = "replace with a current Deep Learning Base GPU AMI for your region"


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config(raw_text) -> dict:
    cfg = yaml.safe_load(raw_text)
    assert isinstance(cfg, dict), "cluster.yaml must be a mapping"
    return cfg


@pytest.fixture(scope="module")
def ray_util():
    """Ray's prepare_config and validate_config, what `ray up` runs. They live in a private
    module: should a Ray release move them, the tests that need them skip, and the check
    against Ray's published schema (test_config_matches_rays_published_schema) remains."""
    return pytest.importorskip("ray.autoscaler._private.util")


@pytest.fixture(scope="module")
def prepared(config, ray_util) -> dict:
    return ray_util.prepare_config(copy.deepcopy(config))


# The cluster-level command lists (prepare_config fills a missing one with Ray's defaults).
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _head_and_workers(cfg):
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    return head, types[head], {k: v for k, v in types.items() if k != head}


def _all_commands(cfg) -> list[str]:
    keys = COMMAND_KEYS
    cmds = [c for k in keys for c in (cfg.get(k) or [])]
    for node_type in cfg["available_node_types"].values():
        for k in ("initialization_commands", "worker_setup_commands"):
            cmds += node_type.get(k) or []
    return cmds


# --------------------------------------------------------------------------- #
# Ray's own validation
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(60)
def test_config_matches_rays_published_schema(config):
    """Through Ray's public API (ray.autoscaler.sdk.fillout_defaults) and the JSON schema Ray
    ships (ray/autoscaler/ray-schema.json): the filled config validates, a broken one does not."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler.sdk import fillout_defaults

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    filled = fillout_defaults(copy.deepcopy(config))
    jsonschema.validate(filled, schema)
    for path, value in (
        (("available_node_types", "gpu_worker", "resources", "GPU"), "four"),
        (("max_workers",), -1),
        (("provider",), "aws"),
    ):
        bad = copy.deepcopy(filled)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_ray_validate_config_accepts_prepared_config(prepared, ray_util):
    ray_util.validate_config(prepared)  # raises on an invalid config


def test_validation_really_checks_something(prepared, ray_util):
    """Guard against a validate_config that silently accepts anything."""
    validate_config = ray_util.validate_config
    bad = copy.deepcopy(prepared)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "four"
    with pytest.raises(Exception):
        validate_config(bad)
    bad = copy.deepcopy(prepared)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(Exception):
        validate_config(bad)


def test_all_command_lists_are_explicit(config):
    """prepare_config falls back to Ray's AWS defaults for a missing list, which
    would install a Ray nightly wheel on every node: every list must be ours."""
    for key in COMMAND_KEYS:
        assert key in config, f"{key} missing: Ray's defaults would be used"
    assert not any("ray-wheels" in c or "ray-3.0.0.dev" in c for c in _all_commands(config))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(prepared):
    for cmd in _all_commands(prepared):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"bash syntax error in {cmd!r}: {res.stderr}"


# --------------------------------------------------------------------------- #
# Structure bplab relies on
# --------------------------------------------------------------------------- #


def test_top_level_settings(config):
    assert config["cluster_name"] == "bplab"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert "availability_zone" in config["provider"]
    assert "cache_stopped_nodes" in config["provider"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0


def test_head_is_cpu_only(config):
    head_name, head, _ = _head_and_workers(config)
    assert head_name in config["available_node_types"]
    res = head["resources"]
    # Declared explicitly (not auto-detected) and zero: no GPU actor lands on the head.
    assert "GPU" in res and res["GPU"] == 0
    assert res.get("CPU", 0) >= 1


def test_gpu_worker_types(config, prepared):
    _, _, workers = _head_and_workers(config)
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "need at least one worker type with GPU >= 1"
    for name, t in gpu_types.items():
        assert t["resources"].get("CPU", 0) >= t["resources"]["GPU"], name
        lo, hi = t.get("min_workers", 0), t["max_workers"]
        assert 0 <= lo <= hi, f"{name}: min_workers {lo} > max_workers {hi}"
        assert hi <= config["max_workers"], f"{name}: above the global max_workers"
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    # After prepare_config Ray caps the head at 0 extra nodes of its type.
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_node_configs(config, raw_text):
    images = set()
    for name, t in config["available_node_types"].items():
        nc = t["node_config"]
        assert nc.get("InstanceType"), name
        assert nc.get("ImageId", "").startswith("ami-"), name
        images.add(nc["ImageId"])
        disks = nc.get("BlockDeviceMappings") or []
        assert disks and disks[0]["Ebs"]["VolumeSize"] >= 100, f"{name}: root disk too small"
    # Same AMI everywhere: Ray needs the same Python version on head and workers.
    assert len(images) == 1
    # Each ImageId line is flagged as a placeholder, in its comment.
    lines = raw_text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*ImageId\s*:", line):
            around = " ".join(lines[max(0, i - 3) : i + 1])
            assert AMI_NOTE in around, f"line {i + 1}: ImageId without the placeholder note"


def test_file_mounts_include_project_and_token(config):
    mounts = config["file_mounts"]
    assert mounts.get("~/bplab") == ".", "project must be mounted at ~/bplab from '.'"
    token_mounts = {r: l for r, l in mounts.items() if r.endswith(".ray/auth_token")}
    assert token_mounts, "the auth token must be mounted on every node"
    assert all(l.endswith(".ray/auth_token") for l in token_mounts.values())


def test_setup_installs_project(prepared):
    # After prepare_config, setup_commands are merged into both head and worker lists.
    project = re.compile(r"pip install\b[^\n;&|]*\s-e\s+[\"']?(~|\$HOME|\$\{HOME\})/bplab\b")
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(project.search(c) for c in prepared[key]), f"{key} does not install ~/bplab"
    assert any(re.search(r"bplab\[gpu\]", c) for c in prepared["worker_setup_commands"])
    assert not any(re.search(r"bplab\[gpu\]", c) for c in prepared["head_setup_commands"])
    # The AWS autoscaler on the head needs boto3.
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_start_commands(config):
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    assert head[0].strip() == "ray stop" and workers[0].strip() == "ray stop"
    head_start = [c for c in head if "ray start" in c]
    worker_start = [c for c in workers if "ray start" in c]
    assert len(head_start) == 1 and len(worker_start) == 1
    for flag in (
        "--head",
        "--port=6379",
        "--object-manager-port=8076",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
        "--dashboard-host=0.0.0.0",
    ):
        assert flag in head_start[0], flag
    for flag in ("--address=$RAY_HEAD_IP:6379", "--object-manager-port=8076"):
        assert flag in worker_start[0], flag


# --------------------------------------------------------------------------- #
# Token authentication stays on
# --------------------------------------------------------------------------- #

AUTH_OFF_PATTERNS = [
    r"RAY_AUTH_MODE\s*[=:]\s*[\"']?(?!token\b)\w+",  # any mode other than token
    r"\bAUTH_MODE\b[\"']?\s*[:=]\s*[\"']?disabled",  # e.g. in --system-config
    r"unset\s+RAY_AUTH_MODE",
    r"env\s+-u\s+RAY_AUTH_MODE",
    r"--disable[-_]?auth",
    r"--no[-_]?auth\b",
    r"auth[-_ ]?mode\W+disabled",
]


@pytest.mark.parametrize("pattern", AUTH_OFF_PATTERNS)
def test_auth_is_not_switched_off(raw_text, pattern):
    # Whole raw text, comments included: no recipe for turning auth off either.
    hits = [ln for ln in raw_text.splitlines() if re.search(pattern, ln, re.IGNORECASE)]
    assert not hits, f"authentication switched off/weakened: {hits}"


def test_auth_off_patterns_catch_known_offenders():
    offenders = [
        "export RAY_AUTH_MODE=disabled",
        "RAY_AUTH_MODE='disabled' ray start --head",
        "ray start --head --system-config='{\"AUTH_MODE\": \"disabled\"}'",
        "unset RAY_AUTH_MODE; ray start",
        "ray start --disable-auth",
    ]
    for o in offenders:
        assert any(re.search(p, o, re.IGNORECASE) for p in AUTH_OFF_PATTERNS), o
    assert not any(
        re.search(p, "export RAY_AUTH_MODE=token", re.IGNORECASE) for p in AUTH_OFF_PATTERNS
    )


def test_every_ray_start_runs_with_token_auth(config):
    """RAY_AUTH_MODE=token on each `ray start` (a worker without it is rejected by
    the head's GCS), and exported for all later launcher shells via ~/.bashrc."""
    starts = [
        c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert starts
    for c in starts:
        assert re.search(r"RAY_AUTH_MODE=token\b", c.split("ray start")[0]), c
    assert any(
        "RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["initialization_commands"]
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_initialization_commands_in_a_scratch_home(config, tmp_path):
    """Run the initialization commands against a throwaway $HOME: they must fail
    without a token, and succeed (idempotently) with one."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}

    def run_all():
        for cmd in config["initialization_commands"]:
            r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                return r
        return None

    failed = run_all()
    assert failed is not None and "auth_token" in failed.stderr

    (home / ".ray").mkdir()
    token = home / ".ray" / "auth_token"
    token.write_text("0123456789abcdef")
    token.chmod(0o644)
    assert run_all() is None
    assert run_all() is None  # second `ray up`
    assert (token.stat().st_mode & 0o777) == 0o600
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.count("export RAY_AUTH_MODE=token") == 1


# --------------------------------------------------------------------------- #
# Every key has a comment
# --------------------------------------------------------------------------- #


def _comment_start(line: str) -> int:
    """Index of the '#' opening a YAML comment on `line` (outside quotes, at line
    start or after a blank), or -1."""
    in_single = in_double = False
    prev = ""
    for i, ch in enumerate(line):
        if ch == "'" and not in_double:
            in_single = not in_single
        elif ch == '"' and not in_single and prev != "\\":
            in_double = not in_double
        elif ch == "#" and not in_single and not in_double and (i == 0 or line[i - 1] in " \t"):
            return i
        prev = ch
    return -1


def _has_inline_comment(line: str) -> bool:
    return _comment_start(line) >= 0


def _key_nodes(text: str):
    """(line index, key) of every mapping key, as located by the YAML parser itself
    (so keys inside list items and flow mappings count, text in block scalars does not)."""
    root = yaml.compose(text)
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                found.append((k.start_mark.line, str(k.value)))
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(found)


def _uncommented_keys(text: str) -> list[str]:
    lines = text.splitlines()
    missing = []
    for idx, key in _key_nodes(text):
        above = lines[idx - 1].lstrip() if idx > 0 else ""
        if _has_inline_comment(lines[idx]) or above.startswith("#"):
            continue
        missing.append(f"line {idx + 1}: {key}")
    return missing


def test_key_regex_and_parser_agree(raw_text):
    """A line regex for keys and the parser find the same key lines (the file has
    no block scalars), so the parser-based check covers every regex-visible key."""
    regex = re.compile(r"^\s*(?:-\s+)?[\w\"'~/.\[\]$-]+\s*:(\s|$)")
    by_regex = {
        i
        for i, ln in enumerate(raw_text.splitlines())
        if not ln.lstrip().startswith("#") and regex.match(ln)
    }
    by_parser = {i for i, _ in _key_nodes(raw_text)}
    assert by_regex == by_parser


def test_every_key_is_commented(raw_text):
    missing = _uncommented_keys(raw_text)
    assert not missing, "keys without a comment (inline or directly above):\n" + "\n".join(missing)


def test_comment_check_catches_each_removed_comment(raw_text):
    """Mutation test: strip the comment(s) of each key in turn; the check must flag it."""
    lines = raw_text.splitlines()
    keys = _key_nodes(raw_text)
    assert len(keys) > 30
    for idx, key in keys:
        mutated = list(lines)
        line = mutated[idx]
        if _has_inline_comment(line):
            mutated[idx] = line[: _comment_start(line)].rstrip()
        j = idx - 1
        while j >= 0 and mutated[j].lstrip().startswith("#"):
            del mutated[j]
            j -= 1
        text = "\n".join(mutated) + "\n"
        assert yaml.safe_load(text) == yaml.safe_load(raw_text)  # only comments removed
        assert any(m.endswith(f": {key}") for m in _uncommented_keys(text)), (
            f"removing the comment of {key!r} (line {idx + 1}) went unnoticed"
        )


# ----------------------------------------------------------------- what a cluster can run


def _cold_view():
    """A cold autoscaling cluster: its configured node types, and the head alone alive (0 GPU)."""
    from jobs.cluster import HEAD_RESOURCE, node_types_from_config
    from jobs.plan import ClusterView

    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 8, "GPU": 0}},
                                       "gpu_worker": {"resources": {"CPU": 48, "GPU": 4, "bplab_trainer": 1000},
                                                      "min_workers": 0, "max_workers": 5},
                                       "cpu_spare": {"resources": {"CPU": 16}, "max_workers": 2}}}
    head = {"name": "head", "CPU": 8.0, "GPU": 0.0, "resources": {"CPU": 8.0, HEAD_RESOURCE: 1.0}, "max": 1,
            "head": True, "source": "alive"}
    return ClusterView("the test cluster", node_types_from_config(config, "test"), [head], autoscaling=True)


def _planned(n: int, cpus: float = 1.0):
    from types import SimpleNamespace

    from jobs.plan import PlannedCase

    return [PlannedCase(SimpleNamespace(name=f"c{i}"), f"c{i}", cpus, 0.0, 1, 1, None) for i in range(n)]


@pytest.mark.timeout(30)
def test_node_types_of_cluster_yaml_train_on_gpu_workers_only():
    from jobs.plan import cluster_yaml_view

    view = cluster_yaml_view(CLUSTER_YAML)
    by_name = {t["name"]: t for t in view.types}
    assert set(by_name) == {"head", "gpu_worker"}
    assert by_name["head"]["max"] == 1 and by_name["gpu_worker"]["max"] == 4
    assert view.marked and not view.trains(by_name["head"]) and view.trains(by_name["gpu_worker"])
    assert view.default_gpus() == 1.0
    assert _concurrency(view, 20) == (16, None)  # 4 workers x 4 GPUs, not connected


def _concurrency(view, n):
    from jobs.plan import apply_resources, concurrency

    planned = _planned(n)
    apply_resources(planned, view, None)
    return concurrency(planned, view)


@pytest.mark.timeout(30)
def test_a_cold_cluster_plans_from_its_node_types():
    from jobs.plan import PlanError, apply_resources, check_fits, resource_bundles

    view = _cold_view()
    planned = _planned(20)
    assert apply_resources(planned, view, None) == 1.0  # a GPU per case though no GPU is alive
    assert all(p.resources == {"bplab_trainer": 0.001} for p in planned)
    # 3 workers at most (the cluster's max_workers), 4 GPUs each; nothing alive trains yet
    assert _concurrency(view, 20) == (12, 0)
    assert _concurrency(view, 5) == (5, 0)
    assert resource_bundles(planned, 3) == [{"CPU": 1.0, "GPU": 1.0, "bplab_trainer": 0.001}] * 3
    with pytest.raises(PlanError, match="5 GPU"):
        apply_resources(_planned(2), view, 5)
    # the head and the CPU type never train: a CPU-only study has no place there either
    cpu_only = _planned(2, cpus=1)
    for case in cpu_only:
        case.resources = view.case_resources()
    check_fits(cpu_only, view.trainable(), view.where)  # fits the GPU worker's CPUs
    assert [t["name"] for t in view.trainable()] == ["gpu_worker"]


@pytest.mark.timeout(30)
def test_local_ray_trains_on_the_local_node():
    from jobs.plan import ClusterView

    local = {"name": "local", "CPU": 2.0, "GPU": 0.0, "resources": {"CPU": 2.0}, "max": 1, "head": True,
             "source": "alive"}
    view = ClusterView("local Ray", None, [local])
    assert not view.marked and view.case_resources() == {} and view.default_gpus() == 0.0
    assert _concurrency(view, 6) == (2, 2)


@pytest.mark.timeout(30)
def test_per_case_data_path_override():
    from jobs.suites import SuiteError, load_suite

    suite = load_suite("adversarial-quick", ["adv.data.path=/data/mnist", "nokland.epochs=7", "lr=0.5"])
    by_name = {c.name: c.settings for c in suite.cases}
    assert by_name["adv"].data.path == "/data/mnist" and by_name["standard"].data.path is None
    assert by_name["nokland"].epochs == 7 and by_name["adv"].epochs == 3
    assert {s.lr for s in by_name.values()} == {0.5}
    with pytest.raises(SuiteError, match="zz"):
        load_suite("adversarial-quick", ["zz.epochs=3"])
    with pytest.raises(SuiteError, match="name a setting after the case"):
        load_suite("adversarial-quick", ["adv=3"])


@pytest.mark.timeout(60)
def test_missing_data_names_the_places_and_the_node(tmp_path, monkeypatch):
    import platform

    from workers.data import DataError, DataSpec, load_dataset

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        load_dataset(DataSpec(name="mnist"))
    message = str(error.value)
    assert str(tmp_path / "data" / "mnist") in message and f"looked on node {platform.node()}" in message
    assert message.count(str(tmp_path)) == 3  # ./data/mnist, ~/data/mnist, ~/.keras/datasets


@pytest.mark.timeout(30)
def test_source_digest_follows_the_code(tmp_path):
    from jobs.study import source_digest

    for folder in ("jobs", "workers", "analysis"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text(f"# {folder}\n")
    (tmp_path / "jobs" / "suites").mkdir()
    (tmp_path / "jobs" / "suites" / "s.yaml").write_text("name: s\n")
    (tmp_path / "notes.py").write_text("not run\n")
    first = source_digest(tmp_path)
    assert first["source_files"] == 4
    (tmp_path / "notes.py").write_text("changed, still not run\n")
    assert source_digest(tmp_path) == first
    (tmp_path / "workers" / "m.py").write_text("# changed\n")
    assert source_digest(tmp_path)["source_sha256"] != first["source_sha256"]


@pytest.mark.timeout(30)
def test_runs_go_to_bplab_runs_inside_a_ray_job(monkeypatch, tmp_path):
    from jobs.study import runs_root

    monkeypatch.delenv("BPLAB_RUNS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert runs_root() == Path("runs")
    job_copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    assert runs_root() == tmp_path / "bplab-runs"
    monkeypatch.setenv("BPLAB_RUNS", "~/elsewhere")
    assert runs_root() == tmp_path / "elsewhere"
