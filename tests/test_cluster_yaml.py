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
