"""cluster.yaml (the `ray up` config) against the schema Ray ships, and the properties the platform relies on.

No cluster and no cloud calls. The test does what `ray up` does before it contacts AWS: the raw file is
checked against ray/autoscaler/ray-schema.json, then prepare_config fills in the AWS defaults and Ray's own
validate_config checks the result.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"

# Ray system-config keys for GCS node health checks (RayConfig; ray/includes/ray_config.pxd, exposed on
# ray._raylet.Config). An unknown key makes the GCS abort at start ("Received unexpected config parameter").
HEALTH_CHECK_KEYS = {"health_check_period_ms", "health_check_timeout_ms", "health_check_failure_threshold",
                     "health_check_initial_delay_ms"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def head_type(cluster: dict) -> dict:
    return cluster["available_node_types"][cluster["head_node_type"]]


def worker_types(cluster: dict) -> dict:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def ray_start(commands: list[str], head: bool) -> list[str]:
    """The tokens of the `ray start` invocation in a list of start commands (shell-split, `;` separated)."""
    for command in commands:
        for part in command.split(";"):
            tokens = shlex.split(part)
            if tokens[:2] == ["ray", "start"] and (("--head" in tokens) == head):
                return tokens
    raise AssertionError(f"no `ray start{' --head' if head else ''}` in {commands}")


def flag(tokens: list[str], name: str) -> str | None:
    for i, t in enumerate(tokens):
        if t.startswith(name + "="):
            return t.split("=", 1)[1]
        if t == name and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def exported(command_list: list[str]) -> dict[str, str]:
    """Variables set by `export A=1 B=2` in the commands (the ones `ray start` inherits)."""
    env = {}
    for command in command_list:
        for part in command.split(";"):
            tokens = shlex.split(part)
            if tokens[:1] == ["export"]:
                env.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
    return env


def test_raw_file_matches_rays_schema(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_schema_is_live(cluster, schema):
    # The schema rejects misspelled keys and wrong types, so passing the test above means something.
    bad = copy.deepcopy(cluster)
    bad["available_node_types"][bad["head_node_type"]]["resource"] = {"CPU": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster)
    next(iter(worker_types(bad).values()))["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_up_validation_passes(cluster):
    # What `ray up` runs before it contacts the provider (commands._bootstrap_config).
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_head_is_cpu_only(cluster):
    resources = head_type(cluster)["resources"]
    assert resources.get("GPU", 0) == 0, resources
    assert resources.get("CPU", 0) >= 1, "the head should offer a few CPUs, not CPU: 0"


def test_a_gpu_worker_type_autoscales(cluster):
    gpu = {k: v for k, v in worker_types(cluster).items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker node type with GPU >= 1"
    scaling = [k for k, v in gpu.items() if v.get("max_workers", 0) > v.get("min_workers", 0)]
    assert scaling, f"GPU worker types {sorted(gpu)} cannot scale (max_workers <= min_workers)"
    assert cluster["max_workers"] > sum(gpu[k].get("min_workers", 0) for k in scaling)


def test_dashboard_is_bound_to_loopback(cluster):
    tokens = ray_start(cluster["head_start_ray_commands"], head=True)
    assert flag(tokens, "--dashboard-host") == "127.0.0.1", tokens
    assert not cluster["provider"].get("security_group", {}).get("IpPermissions"), \
        "no extra inbound rules beyond Ray's default SSH/intra-cluster ones"


def test_setup_installs_the_project(cluster):
    assert cluster["file_mounts"].get("~/openclaw") == "."
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and "-e ~/openclaw" in c]
    assert installs, cluster["setup_commands"]
    # every node the same Ray as the head's (Ray refuses another), whenever the autoscaler adds it
    import ray
    assert any(f"ray[train,data,tune,default]=={ray.__version__}'" in c for c in installs), installs
    assert "chmod 600 ~/.ray/auth_token" in cluster["setup_commands"]


def test_fast_node_failure_detection(cluster):
    from ray._raylet import Config
    from ray.train.v2._internal import constants as train_constants

    head = ray_start(cluster["head_start_ray_commands"], head=True)
    system_config = json.loads(flag(head, "--system-config") or "{}")
    assert set(system_config) <= HEALTH_CHECK_KEYS and all(hasattr(Config, k) for k in system_config)
    assert system_config.get("health_check_period_ms", Config.health_check_period_ms()) <= 1000
    assert system_config.get("health_check_failure_threshold", Config.health_check_failure_threshold()) <= 5

    train_env = {train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR: "0.25"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = exported(cluster[key])
        assert train_env.items() <= env.items(), (key, env)
        assert env.get("RAY_AUTH_MODE") == "token", (key, env)
        # the job's `failure.worker_start_timeout_s` sets it; one exported here overrode every job's
        assert train_constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR not in env, (key, env)
    # `ray job stop` SIGKILLs 3 s after its SIGTERM by default: too soon for the workers' stop checkpoint
    assert float(exported(cluster["head_start_ray_commands"]).get("RAY_JOB_STOP_WAIT_TIME_S", 3)) >= 60
