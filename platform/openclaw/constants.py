"""Environment-variable tunables and fixed names, in one place. Units are in the names."""
from __future__ import annotations

import os

DEFAULT_MLFLOW_DB = "mlflow.db"
"""MLflow's sqlite store, in the working folder, when no tracking URI is configured."""

JOB_FILE = "openclaw_job.json"
"""Written in the run's storage folder: the MLflow run id, so a re-submitted job continues its run."""

SHIP_PACKAGE_ENV_VAR = "OPENCLAW_SHIP_PACKAGE"
"""Set to 1 (by jobs/*.py when openclaw is not installed) to send the package to workers as a py_module."""

FORWARDED_ENV_PREFIXES = ("OPENCLAW_", "MLFLOW_", "AWS_")
"""Driver environment variables forwarded to every worker (tracking credentials, storage endpoints)."""


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
