"""Shared fixtures: datasets made by the real recipes, one real local Ray instance per session, and an
MLflow sqlite store per test. Nothing here is mocked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def prepare(name: str, out: Path, *args: str) -> Path:
    if not (out / "stats.json").exists():
        subprocess.run([PY, str(REPO / "data" / "prepare.py"), name, "--out", str(out), *args], check=True,
                       capture_output=True)
    return out


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    return prepare("digits", tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    return prepare("text", tmp_path_factory.mktemp("text"), "--max-bytes", "3000000", "--seq-len", "64")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session, with more logical CPUs than cores."""
    import ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def digits_config(digits_dir: Path, tmp_path: Path, mlflow_uri: str, **overrides):
    """The shipped digits example, pointed at test folders, with dotted-key overrides."""
    from openclaw import load_config
    base = {"data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "val"),
            "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri}
    return load_config(REPO / "jobs" / "configs" / "digits.yaml", {**base, **overrides})
