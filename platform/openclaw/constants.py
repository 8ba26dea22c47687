"""Environment-variable tunables and fixed names, in one place. Units are in the names."""
from __future__ import annotations

import os

DEFAULT_MLFLOW_DB = "mlflow.db"
"""MLflow's sqlite store, in the working folder, when no tracking URI is configured."""


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store in the working folder (absolute, so that every process
    of the job, whatever its working folder, writes to the same store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(DEFAULT_MLFLOW_DB)}"

JOB_FILE = "openclaw_job.json"
"""Written in the run's storage folder: the MLflow run id, so a re-submitted job continues its run."""

SHIP_PACKAGE_ENV_VAR = "OPENCLAW_SHIP_PACKAGE"
"""Set to 1 (by jobs/*.py when openclaw is not installed) to send the package to workers as a py_module."""

FORWARDED_ENV_PREFIXES = ("OPENCLAW_", "MLFLOW_", "AWS_")
"""Driver environment variables forwarded to every worker (tracking credentials, storage endpoints)."""


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


PREEMPTION_WATCHER_ENV_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
PREEMPTION_POLL_INTERVAL_S_ENV_VAR = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
DEFAULT_PREEMPTION_POLL_INTERVAL_S = 5.0
"""Ray Train's own name and default: how often the node-drain watcher polls the GCS."""

RAY_TRAIN_DEFAULTS = {
    # The controller polls workers (and drains their one-slot report queue) at this interval. Ray's
    # default of 2 s stalls every checkpoint report for up to 2 s and detects dead workers late.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Ray's drain watcher is a new actor process at every worker-group start; openclaw keeps one per run
    # instead (`node_watch.PreemptionNotices`).
    PREEMPTION_WATCHER_ENV_VAR: "0",
}
"""Ray Train tunables openclaw sets in the driver (Ray forwards them to its controller) unless the
user already set them."""


WORKER_GROUP_START_TIMEOUT_ENV_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Set from `failure.worker_start_timeout_s` unless the user set it in the environment."""

_SET_BY_OPENCLAW: set[str] = set()


def apply_ray_train_defaults(worker_start_timeout_s: float) -> None:
    """Set openclaw's Ray Train tunables for this run, leaving alone any the user set (a value openclaw
    set for an earlier run in this process is replaced: a later config may differ)."""
    for key, value in {**RAY_TRAIN_DEFAULTS, WORKER_GROUP_START_TIMEOUT_ENV_VAR: str(worker_start_timeout_s)}.items():
        if key not in os.environ or key in _SET_BY_OPENCLAW:
            os.environ[key] = value
            _SET_BY_OPENCLAW.add(key)


def run_preemption_watcher() -> bool:
    """Whether openclaw watches for node drains itself: yes, unless the user set Ray's own switch (then
    Ray's per-group watcher runs, or none)."""
    return PREEMPTION_WATCHER_ENV_VAR in _SET_BY_OPENCLAW


def preemption_poll_interval_s() -> float:
    return float(os.environ.get(PREEMPTION_POLL_INTERVAL_S_ENV_VAR, DEFAULT_PREEMPTION_POLL_INTERVAL_S))


NODE_WATCH_INTERVAL_S_ENV_VAR = "OPENCLAW_NODE_WATCH_INTERVAL_S"
DEFAULT_NODE_WATCH_INTERVAL_S = 0.5
"""How often an elastic run's driver polls the node table for joins and deaths."""


def node_watch_interval_s() -> float:
    return float(os.environ.get(NODE_WATCH_INTERVAL_S_ENV_VAR, DEFAULT_NODE_WATCH_INTERVAL_S))


NODE_DEATH_WAIT_S_ENV_VAR = "OPENCLAW_NODE_DEATH_WAIT_S"
DEFAULT_NODE_DEATH_WAIT_S = 30.0
"""After a worker failure with an unreachable node: the longest wait for the GCS to declare it dead."""


def node_death_wait_s() -> float:
    return float(os.environ.get(NODE_DEATH_WAIT_S_ENV_VAR, DEFAULT_NODE_DEATH_WAIT_S))


CHECKPOINT_BEFORE_GROW_S_ENV_VAR = "OPENCLAW_CHECKPOINT_BEFORE_GROW_S"
DEFAULT_CHECKPOINT_BEFORE_GROW_S = 30.0
"""Elastic runs: when nodes join, the longest wait for the workers' checkpoint before Ray may resize."""


def checkpoint_before_grow_s() -> float:
    return float(os.environ.get(CHECKPOINT_BEFORE_GROW_S_ENV_VAR, DEFAULT_CHECKPOINT_BEFORE_GROW_S))
