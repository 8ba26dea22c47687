"""The job's MLflow run (driver; the tracking actor logs the model of a run whose server was away). One
run per job, found again on resume through a small job file in the run's storage folder; params and the
resolved config at creation; the final model at the end."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterator

import mlflow
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from mlflow.tracking import MlflowClient

from openclaw import constants
from openclaw.config import Config
from openclaw.data.config import DataConfig
from openclaw.data.filesystems import local_copy, storage_filesystem
from openclaw.data.sources import Source, column_to_numpy, resolve
from openclaw.engine.model_io import build_from_config, load_model_dir
from openclaw.errors import CheckpointError
from openclaw.tracking.redact import flatten, public_uri, redacted


def open_run(config: Config, uri: str, storage: str) -> tuple[str, str, bool]:
    """Create the job's MLflow run, or reopen the one recorded in the job folder. Returns (run, experiment, resumed)."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(config.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        config.tracking.experiment, tags={"mlflow.experimentKind": "custom_model_development"})
    job = _read_job_file(storage, config.name)
    if job.get("mlflow_run_id"):
        try:
            run = client.get_run(job["mlflow_run_id"])
            if run.info.lifecycle_stage == "active":
                client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, run.info.experiment_id, True
        except Exception:
            pass
    tags = {"openclaw.name": config.name}
    if config.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = config.tracking.parent_run_id
    run = client.create_run(exp_id, run_name=config.name, tags=tags)
    run_id = run.info.run_id
    params = [mlflow.entities.Param(k, _param_str(v)) for k, v in _flat(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_dict(run_id, redacted(config.resolved()), "config.yaml")  # secret-looking values never logged
    _write_job_file(storage, config.name, {"mlflow_run_id": run_id, "experiment_id": exp_id,
                                           "tracking_uri": public_uri(uri)})
    return run_id, exp_id, False


def record_finished(config: Config, storage: str, step: int, checkpoint: str | None, metrics: dict[str, Any]) -> None:
    """Note in the job file that the run reached its last step (a sweep's rerun trial then only reports it)."""
    job = _read_job_file(storage, config.name)
    job["finished"] = {"step": step, "checkpoint": checkpoint,
                       "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    _write_job_file(storage, config.name, job)


def finished_run(config: Config, storage: str) -> dict[str, Any] | None:
    """What `record_finished` noted for this job name, or None if it has not finished."""
    return _read_job_file(storage, config.name).get("finished")


def _flat(config: Config) -> dict[str, Any]:
    return flatten(redacted(config.resolved()))


def _param_str(v: Any) -> str:
    return (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000]


def _job_fs(storage: str, name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = storage_filesystem(storage)
    return fs, f"{root.rstrip('/')}/{name}/{constants.JOB_FILE}"


def _read_job_file(storage: str, name: str) -> dict[str, Any]:
    fs, path = _job_fs(storage, name)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return {}


def _write_job_file(storage: str, name: str, content: dict[str, Any]) -> None:
    fs, path = _job_fs(storage, name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(content, indent=2).encode())


def resolve_sources(d: DataConfig) -> dict[str, Source]:
    """The run's datasets, resolved (no preparation): where an input example for the model comes from."""
    return {k: resolve(getattr(d, k), f"data.{k}", d.s3, d.on_bad_shard) for k in ("train", "val") if getattr(d, k)}


RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
"""An MLflow run id, as a source to load a model from."""
OPENCLAW_MODEL_DIR = "openclaw-model"
"""Beside the MLflow model: the state dict and the (redacted) config, which load with `weights_only`."""


def log_final_model(config: Config, uri: str, run_id: str, checkpoint: str, sources: dict[str, Source],
                    trust_code: bool = True) -> None:
    """Log the trained model of `checkpoint` (a folder or URI): as an MLflow PyTorch model with a
    signature and an input example (for MLflow's own tools; it loads by unpickling), and as openclaw's
    weights-only state dict and config (what `openclaw.load_model` reads). `trust_code`: the run's own
    config may build its `module:function` model (false for a spool of unknown origin)."""
    with local_copy(checkpoint) as d:
        model = load_model_dir(d, trust_code=trust_code)
    src = sources.get("val") or sources["train"]
    example = None
    if config.data.features in src.schema.names:  # (sync-spool after transforms sees the raw columns: no example)
        first = pq.ParquetFile(src.files[0], filesystem=src.filesystem).read_row_group(0, columns=[config.data.features])
        example = column_to_numpy(first.column(config.data.features)[:2])
        example = example[:, :-1].astype("int64") if config.task == "language_modeling" else example.astype("float32")
    # Explicit requirements: MLflow's inference re-imports the model in a subprocess (about 10 s here).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "openclaw"]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=requirements,
                                        registered_model_name=config.tracking.register_as)
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(redacted(config.resolved()), f, indent=2)
        MlflowClient(uri).log_artifacts(run_id, d, OPENCLAW_MODEL_DIR)
    if config.tracking.register_as:
        print(f"openclaw: registered the model as models:/{config.tracking.register_as}/"
              f"{info.registered_model_version}", flush=True)


def load_logged_model(uri: str, tracking_uri: str, *, trust_code: bool = False,
                      model_fn: Callable[..., torch.nn.Module] | None = None, trust_pickle: bool = False) -> torch.nn.Module:
    """A model logged with `log_final_model`, by `runs:/RUN_ID/model` or `models:/NAME/VERSION`, rebuilt
    from its weights-only state dict and config. `trust_pickle`: unpickle the MLflow model instead
    (it can run code)."""
    mlflow.set_tracking_uri(tracking_uri)
    if trust_pickle:
        return mlflow.pytorch.load_model(uri, dst_path=None)
    client = MlflowClient(tracking_uri)
    run_id = _source_run(client, uri)
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        try:
            folder = client.download_artifacts(run_id, OPENCLAW_MODEL_DIR, d)
        except Exception:
            raise CheckpointError(f"MLflow run {run_id} ({uri}) has no {OPENCLAW_MODEL_DIR}/ (an older openclaw logged "
                                  f"it): load its checkpoint instead, or pass trust_pickle=True to unpickle its MLflow "
                                  f"model if you trust where it came from.") from None
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        weights = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    model = build_from_config(config, f"MLflow model {uri}", trust_code=trust_code, model_fn=model_fn)
    model.load_state_dict(weights)
    return model.eval()


EXPORT_KIND, EXPORT_DIR = "export", "quantized"
"""An `openclaw export` run is tagged `openclaw.kind: export` and keeps the export folder under `quantized/`."""


@contextlib.contextmanager
def logged_export(uri: str, tracking_uri: str) -> Iterator[str | None]:
    """The export folder of `uri`, downloaded to a temporary folder, when `uri` names an `openclaw export`
    run (`runs:/RUN_ID/quantized`, or a model version registered from one); else None."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(_source_run(client, uri))
    if run.data.tags.get("openclaw.kind") != EXPORT_KIND:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="openclaw-export-") as d:
        yield client.download_artifacts(run.info.run_id, EXPORT_DIR, d)


def load_logged_config(uri: str, tracking_uri: str) -> tuple[dict[str, Any], str]:
    """(the redacted config, the run id) of a model logged with `log_final_model`."""
    client = MlflowClient(tracking_uri)
    run_id = _source_run(client, uri)
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        try:
            path = client.download_artifacts(run_id, f"{OPENCLAW_MODEL_DIR}/config.json", d)
        except Exception:
            raise CheckpointError(f"MLflow run {run_id} ({uri}) has no {OPENCLAW_MODEL_DIR}/config.json (an older "
                                  f"openclaw logged it): export from its checkpoint instead.") from None
        with open(path) as f:
            return json.load(f), run_id


def _source_run(client: MlflowClient, uri: str) -> str:
    """The run that logged `runs:/RUN_ID/...` or `models:/NAME/VERSION` (or `models:/NAME@ALIAS`)."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    name, _, version = ref.partition("/")
    return client.get_model_version(name, version).run_id
