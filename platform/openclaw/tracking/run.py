"""The job's MLflow run (driver). One run per job, found again on resume through a small job file in the
run's storage folder; params and the resolved config at creation. The final model: `tracking.model`."""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique, validate_param_and_metric_name
from mlflow.tracking import MlflowClient

from openclaw.config import Config
from openclaw.errors import CheckpointError, ConfigError, OpenClawError
from openclaw.tracking.job_file import _read_job_file, _write_job_file
from openclaw.tracking.redact import flatten, public_uri, redacted


_STORE_SCHEMES = frozenset({"", "file", "http", "https", "databricks", "databricks-uc", "uc", *DATABASE_ENGINES})
"""The URI schemes of MLflow 3's built-in tracking stores (a database's: `postgresql+psycopg2` counts as
`postgresql`); plugins add theirs through the `mlflow.tracking_store` entry points."""


def check_tracking_uri(uri: str, key: str) -> None:
    """Before Ray starts, a ConfigError naming `key` for a URI that no MLflow tracking store takes (a typo:
    `htp://host:5000`; a folder, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set), or for an
    MLflow server that does not answer: MLflow itself raised only when the run opened, after Ray started
    and the data was prepared, and retried an unreachable server for minutes first."""
    scheme = store_scheme(uri)
    if scheme is None:
        raise ConfigError(f"`{key}`: {public_uri(uri)!r} has the scheme {urllib.parse.urlparse(uri).scheme!r}, which "
                          f"no MLflow tracking store takes. Use http(s)://HOST:PORT for an MLflow server, or "
                          f"sqlite:///PATH for a local store.")
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(f"`{key}`: {public_uri(uri)!r} is a folder, which MLflow 3 no longer takes as a tracking "
                          f"store: use sqlite:///PATH (or set MLFLOW_ALLOW_FILE_STORE=true).")
    if scheme in ("http", "https"):
        _answers(uri, key)


def check_param_keys(config: Config) -> None:
    """Every config key, as the run's params name it, must be one MLflow takes: a `model.kwargs` key with
    `@` or `+`, or past 250 characters, failed the run's opening after Ray started, and each retry left
    a run behind in MLflow."""
    for key in _flat(config):
        if len(key) > MAX_ENTITY_KEY_LENGTH or not validate_param_and_metric_name(key) or path_not_unique(key):
            raise ConfigError(f"`{key}`: MLflow takes no param of that name (letters, digits, `_ - . / :` and spaces, "
                              f"at most {MAX_ENTITY_KEY_LENGTH} characters, no `..` or `//`); rename the key.")


def store_scheme(uri: str) -> str | None:
    """The MLflow tracking store a URI names, by its scheme (a database's `postgresql+psycopg2` counts as
    `postgresql`; "" for a folder), or None where no store takes it."""
    if uri in {"databricks", "databricks-uc", "uc"}:  # a profile name
        return uri
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]
    scheme = "" if len(scheme) == 1 else scheme  # a Windows drive
    return scheme if scheme in _STORE_SCHEMES | {e.name for e in entry_points(group="mlflow.tracking_store")} else None


def _answers(uri: str, key: str, timeout_s: float = 10.0) -> None:
    """Whether anything answers at an MLflow server's URI (any HTTP status will do: a server that wants a
    login answers too); a ConfigError if nothing does."""
    import requests
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as e:
        raise ConfigError(f"`{key}`: no MLflow server answers at {public_uri(uri)} ({type(e).__name__}). Start it, "
                          f"or point `tracking.uri` at one that runs.") from None


def open_run(config: Config, uri: str, storage: str) -> tuple[str, str, bool]:
    """Create the job's MLflow run, or reopen the one recorded in the job folder. Returns (run, experiment, resumed)."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(config.tracking.experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(f"`tracking.experiment` ({config.tracking.experiment!r}) is deleted in MLflow at "
                          f"{public_uri(uri)}: restore it (`mlflow experiments restore --experiment-id "
                          f"{exp.experiment_id}`), or set `tracking.experiment` to another name.")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        config.tracking.experiment, tags={"mlflow.experimentKind": "custom_model_development"})
    job = _read_job_file(storage, config.name)
    if job.get("mlflow_run_id"):
        recorded = job.get("tracking_uri")
        if recorded and recorded != public_uri(uri):
            raise ConfigError(f"run {config.name!r} is recorded in MLflow at {recorded} (run {job['mlflow_run_id']}), "
                              f"not at {public_uri(uri)}: set `tracking.uri` (or $MLFLOW_TRACKING_URI) to it to resume "
                              f"the run there, or set a new `name`.")
        try:
            run = client.get_run(job["mlflow_run_id"])
        except MlflowException as e:  # only a run the store no longer has is replaced; another error is raised
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(run.info.run_id, status="RUNNING")
            opened = job.get("opened", True)  # (job files from before the key: opened)
            if not opened:
                _log_config(client, run.info.run_id, config, storage, job)
            return run.info.run_id, run.info.experiment_id, opened
    tags = {"openclaw.name": config.name}
    if config.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = config.tracking.parent_run_id
    run = client.create_run(exp_id, run_name=config.name, tags=tags)
    job = {"mlflow_run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": public_uri(uri), "opened": False}
    _write_job_file(storage, config.name, job)  # at once: a failure below reopens this run, not a second one
    _log_config(client, run.info.run_id, config, storage, job)
    return run.info.run_id, exp_id, False


def _log_config(client: MlflowClient, run_id: str, config: Config, storage: str, job: dict[str, Any]) -> None:
    """A new run's params and `config.yaml`, then its job file marked `opened` (a run whose opening failed
    halfway gets them on the next command's reopen, as a start: the params it has keep their values, as
    MLflow refuses to change one)."""
    logged = client.get_run(run_id).data.params
    params = [mlflow.entities.Param(k, _param_str(v)) for k, v in _flat(config).items() if k not in logged]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_dict(run_id, redacted(config.resolved()), "config.yaml")  # secret-looking values never logged
    _write_job_file(storage, config.name, {**job, "opened": True})


def _flat(config: Config) -> dict[str, Any]:
    return flatten(redacted(config.resolved()))


def _param_str(v: Any) -> str:
    return (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000]


RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
"""An MLflow run id, as a source to load a model from."""
OPENCLAW_MODEL_DIR = "openclaw-model"
"""Beside the MLflow model: the state dict and the (redacted) config, which load with `weights_only`."""


EXPORT_KIND, EXPORT_DIR = "export", "quantized"
"""An `openclaw export` run is tagged `openclaw.kind: export` and keeps the export folder under `quantized/`."""


@contextlib.contextmanager
def logged_export(uri: str, tracking_uri: str) -> Iterator[str | None]:
    """The export folder of `uri`, downloaded to a temporary folder, when `uri` names an `openclaw export`
    run (`runs:/RUN_ID/quantized`, or a model version registered from one); else None."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(source_run(client, uri)[0])
    if run.data.tags.get("openclaw.kind") != EXPORT_KIND:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="openclaw-export-") as d:
        yield client.download_artifacts(run.info.run_id, EXPORT_DIR, d)


def model_folder(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(the run, the artifact folder of openclaw's copy of the model) that `uri` names. A run may log its
    final model more than once (a resume that trains on, a spool uploaded after a partial end): each is in
    `openclaw-model/<model id>/`, and `openclaw-model/latest.json` names the newest (what `runs:/RUN/model`
    means). A model version is its own logged model. Older runs: the files at `openclaw-model/` itself."""
    run_id, version = source_run(client, uri)
    model_id = None
    if version is not None:
        # MLflow 3: the version's source is its logged model (`models:/m-...`); model_id is not always filled
        source = version.source or ""
        model_id = getattr(version, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/")
                                                          else None)
    elif any(a.path.endswith("/latest.json") for a in client.list_artifacts(run_id, OPENCLAW_MODEL_DIR)):
        # (an older run has none: its files are the folder's own) a failure to read it is raised, not taken
        # for an older run's layout, whose message would blame an older openclaw
        with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
            with open(client.download_artifacts(run_id, f"{OPENCLAW_MODEL_DIR}/latest.json", d)) as f:
                model_id = json.load(f)["model_id"]
    if model_id and client.list_artifacts(run_id, f"{OPENCLAW_MODEL_DIR}/{model_id}"):
        return run_id, f"{OPENCLAW_MODEL_DIR}/{model_id}"
    return run_id, OPENCLAW_MODEL_DIR


def load_logged_config(uri: str, tracking_uri: str) -> tuple[dict[str, Any], str]:
    """(the redacted config, the run id) of a model logged with `log_final_model`."""
    client = MlflowClient(tracking_uri)
    run_id, folder = model_folder(client, uri)
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        try:
            path = client.download_artifacts(run_id, f"{folder}/config.json", d)
        except Exception:
            raise no_logged_model(client, run_id, uri, "export from its checkpoint instead") from None
        with open(path) as f:
            return json.load(f), run_id


def no_logged_model(client: MlflowClient, run_id: str, uri: str, otherwise: str) -> OpenClawError:
    """Why MLflow run `run_id` (named by `uri`) has no model that openclaw logged, and what to pass instead:
    a sweep's parent run (its best trial's run), a run that never finished (its newest checkpoint), or
    one an older openclaw logged (`otherwise`)."""
    run = client.get_run(run_id)
    if parent := sweep_parent(run, "pass"):
        return parent
    if run.info.status != "FINISHED":
        folder = f"{run.data.params.get('checkpoint.storage', '<checkpoint.storage>')}/{run.info.run_name}"
        finish = ("`openclaw sweep CONFIG --resume` to finish its sweep" if "mlflow.parentRunId" in run.data.tags
                  else "the same `openclaw train` command to finish it")
        return ConfigError(f"MLflow run {run_id} is {run.info.status}: it has not logged its final model. Pass its "
                           f"newest checkpoint (a checkpoint_* folder in {folder}), or run {finish}.")
    return CheckpointError(f"MLflow run {run_id} ({uri}) has no {OPENCLAW_MODEL_DIR}/ (an older openclaw logged it): "
                           f"{otherwise}.")


def sweep_parent(run: Run, verb: str) -> ConfigError | None:
    """The error for a sweep's parent run given where a training run is wanted (None for any other run):
    it names the best trial's run to `verb` instead."""
    if run.data.tags.get("openclaw.kind") != "sweep":
        return None
    best = run.data.tags.get("best.run_id")
    return ConfigError(f"MLflow run {run.info.run_id} is sweep {run.info.run_name}'s parent run, which trains no "
                       f"model: {verb} " + (f"a trial's run instead, e.g. the best one, {best}." if best else
                                            "one of its trials' runs instead."))


def source_run(client: MlflowClient, uri: str) -> tuple[str, ModelVersion | None]:
    """The run that logged `runs:/RUN_ID/...` or `models:/NAME/VERSION` (or `models:/NAME@ALIAS`), and the
    model version a `models:/` URI names. One that does not exist is a ConfigError that says what to pass."""
    ref = uri.removeprefix("models:/")
    try:
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
            return client.get_run(run_id).info.run_id, None
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.partition("/")
            version = client.get_model_version(name, number)
        return version.run_id, version
    except MlflowException as e:
        what = f"MLflow run {run_id!r}" if uri.startswith("runs:/") else f"registered model version {uri!r}"
        raise unreadable(e, what, client.tracking_uri) from None


def unreadable(e: MlflowException, what: str, tracking_uri: str, models_too: bool = True) -> ConfigError:
    """The error for a run or model the user named that the tracking store does not have (or did not
    answer for). `models_too`: the command also takes a registered model's models:/NAME/VERSION."""
    where = public_uri(tracking_uri)
    if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        models = " or a registered model's models:/NAME/VERSION" if models_too else ""
        return ConfigError(f"there is no {what} at {where} ({e.error_code}). Pass the run id a training run printed "
                           f"(\"MLflow run <id>\"){models}, and `--tracking-uri` if it was logged elsewhere.")
    return ConfigError(f"could not read {what} at {where}: {e.message}. Is the tracking server up, and is "
                       f"`--tracking-uri` the one the run used?")


def metric_histories(client: MlflowClient, run_id: str, keys: list[str]) -> list[list[Metric]]:
    """Each key's logged points, in the order of `keys`: one request per key, 8 at a time over HTTP (a
    tracking server answers them in parallel; a basic-auth one spends most of each request checking the
    password). Serial for other stores (a sqlite store is not shared across threads)."""
    def history(key: str) -> list[Metric]:
        return client.get_metric_history(run_id, key)

    if not client.tracking_uri.startswith(("http://", "https://")):
        return [history(k) for k in keys]
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="openclaw-histories") as pool:
        return list(pool.map(history, keys))
