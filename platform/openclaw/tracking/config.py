"""The `tracking:` config section (foundation: pydantic only)."""
from __future__ import annotations

from pydantic import Field

from openclaw.section import Section


class TrackingConfig(Section):
    enabled: bool = True
    """false: no MLflow run (progress lines and checkpoints as usual), e.g. to measure tracking's cost."""
    uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder."""
    experiment: str = "openclaw"
    """The MLflow experiment that holds the run (created if missing)."""
    register_as: str | None = None
    """Register the final model in the MLflow model registry under this name (a new version per run)."""
    parent_run_id: str | None = None
    """Nest this run under that MLflow run (a sweep sets it on its trials)."""
    flush_timeout_s: float = Field(120.0, ge=0)
    """At the end of a run, how long to wait for an unreachable tracking server before the queued
    metrics are written to a local spool file (uploaded later with `openclaw sync-spool FILE`)."""
