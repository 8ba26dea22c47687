"""The KubeRay manifests, checked offline against the RayJob and RayCluster CRD schemas of a pinned
KubeRay release (deploy/kuberay/crds/, see SOURCE.md), made strict (no unknown key anywhere), and for
what openclaw relies on: Ray's version, token auth, a dashboard kept inside, settings from a Secret, an
entrypoint that exists and a config that loads."""
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"
PINNED_RAY = re.search(r'"ray\[[^\]]*\]>=([0-9.]+),<', (REPO / "pyproject.toml").read_text()).group(1)  # "2.60"


def strict(schema):
    """Every object with declared properties refuses keys it does not declare (the API server would prune
    them silently), except where Kubernetes keeps unknown fields on purpose."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@pytest.fixture(scope="module")
def validators():
    return {kind: Draft7Validator(strict(json.loads((KUBERAY / "crds" / f"{kind.lower()}-v1.schema.json").read_text())))
            for kind in ("RayJob", "RayCluster")}


def _errors(validators, doc):
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_the_manifests_validate_strictly_against_the_pinned_crds(validators, name):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and _errors(validators, doc) == []


def test_the_strict_check_can_fail(validators):
    doc = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # a typo the API server would drop without a word
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokn"
    errors = _errors(validators, doc)
    assert any("shutdownAfterJobFinish" in e for e in errors) and any("tokn" in e for e in errors)


def _cluster(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_what_openclaw_relies_on(name):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    cluster = _cluster(doc)
    assert cluster["rayVersion"].startswith(PINNED_RAY + ".") and cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    groups = [head, *cluster["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    for c in containers:
        assert c["image"].split(":")[1].startswith(PINNED_RAY + "."), c["image"]
        assert {"secretRef": {"name": "openclaw-env"}} in c["envFrom"]
        assert {e["name"] for e in c.get("env", [])} <= {"RAY_JOB_STOP_WAIT_TIME_S"}, \
            "settings come from the Secret, not from the manifest"
    # the head's job server SIGKILLs a stopped job 3 s after its SIGTERM by default: too soon for a checkpoint
    head_env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert float(head_env.get("RAY_JOB_STOP_WAIT_TIME_S", 3)) >= 60
    # worker groups between min and max replicas: the autoscaler must be on, or the replicas stay as set
    assert cluster.get("enableInTreeAutoscaling") is True
    assert any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers)
    base = re.search(r"^FROM rayproject/ray:(\S+)$", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(PINNED_RAY + ".") and all(c["image"].split(":")[1] == base for c in containers)


def test_the_rayjob_entrypoint_exists_and_its_config_loads():
    from openclaw.config import load_config
    doc = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file() and (REPO / argv[2]).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = load_config(REPO / argv[2], overrides)
    assert config.checkpoint.storage.startswith("s3://") and config.scaling.max_workers == 4
