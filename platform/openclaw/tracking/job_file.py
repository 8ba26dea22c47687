"""The job file (driver): `<checkpoint.storage>/<name>/openclaw_job.json`, which names the job's MLflow
run (`open_run` creates or reopens it) and, once the job reached its last step, what it finished with."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs

from openclaw import constants
from openclaw.config import Config
from openclaw.data.filesystems import storage_filesystem
from openclaw.errors import ConfigError


def record_finished(config: Config, storage: str, step: int, checkpoint: str | None, metrics: dict[str, Any]) -> None:
    """Note in the job file that the run reached its last step (a sweep's rerun trial then only reports it)."""
    job = _read_job_file(storage, config.name)
    job["finished"] = {"step": step, "checkpoint": checkpoint,
                       "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    _write_job_file(storage, config.name, job)


def finished_run(config: Config, storage: str) -> dict[str, Any] | None:
    """What `record_finished` noted for this job name, or None if it has not finished."""
    return job_record(config, storage).get("finished")


def job_record(config: Config, storage: str) -> dict[str, Any]:
    """The job file of this job name (`mlflow_run_id`, `experiment_id`, `tracking_uri`, `opened` once the
    run's params and config are logged, and `finished` once it has); {} if there is none yet."""
    return _read_job_file(storage, config.name)


def _job_fs(storage: str, name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = storage_filesystem(storage)
    return fs, f"{root.rstrip('/')}/{name}/{constants.JOB_FILE}"


def _read_job_file(storage: str, name: str) -> dict[str, Any]:
    """{} where the job has none yet. Any other failure is raised: read as {}, a storage error (or a file
    a crash cut short) started a second MLflow run for the job, passed the unsent-spool and finished
    checks, and `record_finished` wrote the file back without the run's id."""
    fs, path = _job_fs(storage, name)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    try:
        job = json.loads(text)
    except ValueError:
        job = None
    if not isinstance(job, dict):
        raise ConfigError(f"The job file {path} cannot be read (not a JSON object): it names the job's MLflow run. "
                          f"Delete it to start the job {name!r} in a new MLflow run, or use a new `name`.")
    return job


def _write_job_file(storage: str, name: str, content: dict[str, Any]) -> None:
    """Whole or not at all: written beside, then moved over it (a driver killed mid-write left it empty)."""
    fs, path = _job_fs(storage, name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(content, indent=2).encode())
    fs.move(tmp, path)
