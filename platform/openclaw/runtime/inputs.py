"""What the driver hands every worker of every attempt: `LoopInputs` (built by the driver, read by every
worker process; the Ray Train controller only unpickles it, with Ray Train's `train_loop_config`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(repr=False)
class LoopInputs:
    """What the driver hands every worker of every attempt (inside Ray Train's `train_loop_config`). Its text
    form names the run only: Ray Train keeps `train_loop_config` as text in its run records (state
    tracking, the dashboard), and the config, the data's settings and `secrets` hold credentials."""
    config: dict[str, Any]
    """The resolved config, as plain data (saved in every checkpoint)."""
    run_id: str
    """The MLflow run ("" with tracking off)."""
    run_dir: str
    """`<checkpoint.storage>/<name>`: checkpoints, the job file, the sample ledger."""
    data: dict[str, dict[str, Any]]
    """{"train": {"spec": ..., "shards": [...]}, "val": ...}: the prepared shards to stream."""
    secrets: dict[str, str]
    """The driver's credentials (`constants.secret_env`): in memory, never in a runtime env."""
    tracking: Any
    """The job's tracking service (a Ray actor), None with tracking off."""
    control: Any
    """The job's control plane (a Ray actor): the driver's stop and checkpoint requests."""
    progress: Any
    """The driver's progress queue."""
    job_start_time: float

    def __repr__(self) -> str:
        return f"LoopInputs(run_id={self.run_id!r}, run_dir={self.run_dir!r})"
