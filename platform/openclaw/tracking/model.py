"""The job's trained model in MLflow (driver; the tracking actor logs the model of a run whose server was
away): logged at the end of a run as an MLflow PyTorch model and as openclaw's weights-only state dict
and config, and loaded back from either."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.tracking import MlflowClient

from openclaw.config import Config
from openclaw.data.config import DataConfig
from openclaw.data.filesystems import local_copy
from openclaw.data.sources import Source, column_to_numpy, resolve
from openclaw.errors import UserError
from openclaw.engine.model_io import build_from_config, load_model_dir
from openclaw.tracking.redact import redacted
from openclaw.tracking.run import OPENCLAW_MODEL_DIR, metric_histories, model_folder, no_logged_model


def resolve_sources(d: DataConfig) -> dict[str, Source]:
    """The run's datasets, resolved (no preparation): where an input example for the model comes from.
    Those that cannot be read now (moved, or on a store whose keys the spooled config holds as `***`) are
    left out: the model is logged without an example."""
    out = {}
    for key in ("train", "val"):
        if getattr(d, key):
            with contextlib.suppress(UserError, OSError):
                out[key] = resolve(getattr(d, key), f"data.{key}", d.s3, d.on_bad_shard)
    return out


def log_final_model(config: Config, uri: str, run_id: str, checkpoint: str, sources: dict[str, Source],
                    trust_code: bool = True) -> None:
    """Log the trained model of `checkpoint` (a folder or URI): as an MLflow PyTorch model with a
    signature and an input example (for MLflow's own tools; it loads by unpickling), and as openclaw's
    weights-only state dict and config (what `openclaw.load_model` reads). `trust_code`: the run's own
    config may build its `module:function` model (false for a spool of unknown origin)."""
    with local_copy(checkpoint) as d:
        model = load_model_dir(d, trust_code=trust_code)
    example = input_example(config, sources.get("val") or sources.get("train"))
    # Explicit requirements: MLflow's inference re-imports the model in a subprocess (about 10 s here).
    # Not "openclaw": PyPI's package of that name is another project, which a tool building the model's
    # environment would install. The default (pt2) format needs no openclaw to load.
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    # The model is the run's LoggedModel, as `log_model` inside the run would make it, but made here: inside
    # the run, MLflow links the run's metrics of step 0 to the model, reading the whole history of every metric
    # of the run to find them (a request each, 48 on digits); the model gets its final evaluation instead.
    logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id, params=run.data.params,
                                            experiment_id=run.info.experiment_id)
    # MLflow 3's default format (pt2) traces the model on the example: without one, the pickle format
    info = mlflow.pytorch.log_model(model, name="model", model_id=logged.model_id, input_example=example,
                                    serialization_format=None if example is not None else "pickle",
                                    pip_requirements=requirements, registered_model_name=config.tracking.register_as)
    final = final_points(client, run_id, [k for k in run.data.metrics if k.startswith(LINKED_METRICS)])
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=max((m.step for m in final), default=0))])
    # The same points (key, value, time and step) with the model's id: the run's histories gain no point.
    client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id)
                                      for m in final])
    # openclaw's copy, this logged model's own (a run that logs again keeps each), and which is the newest
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(redacted(config.resolved()), f, indent=2)
        client.log_artifacts(run_id, d, f"{OPENCLAW_MODEL_DIR}/{logged.model_id}")
        os.remove(os.path.join(d, "model.pt"))  # the run's folder: the newest's config and id (no second copy)
        with open(os.path.join(d, "latest.json"), "w") as f:
            json.dump({"model_id": logged.model_id}, f)
        client.log_artifacts(run_id, d, OPENCLAW_MODEL_DIR)
    if config.tracking.register_as:
        print(f"openclaw: registered the model as models:/{config.tracking.register_as}/"
              f"{info.registered_model_version}", flush=True)


def input_example(config: Config, src: Source | None, rows: int = 2) -> np.ndarray | None:
    """`rows` rows of the features, as the model takes them, for MLflow's export to trace on: from the first
    row groups that hold them (a first shard or row group of 0 or 1 rows fixed the traced batch size to it,
    so the logged model took no other), integers kept integers (a model that embeds token ids, as a
    language model does without its last token). None (the pickle format) where the data has too few
    rows, or no such column (sync-spool after transforms sees the raw columns)."""
    if src is None or config.data.features not in src.schema.names:
        return None
    parts, have = [], 0
    for path in src.files:
        f = pq.ParquetFile(path, filesystem=src.filesystem)
        for g in range(f.num_row_groups):
            if have >= rows:
                break
            column = f.read_row_group(g, columns=[config.data.features]).column(config.data.features)
            parts.append(column_to_numpy(column[:rows - have]))
            have += len(parts[-1])
        if have >= rows:
            break
    if have < rows:
        return None
    example = np.concatenate(parts)
    if config.task == "language_modeling":
        return example[:, :-1].astype("int64")
    return example.astype("int64" if np.issubdtype(example.dtype, np.integer) else "float32")


LINKED_METRICS = ("val/", "train/loss")
"""The metrics whose last points are linked to the logged model (MLflow shows them with the model)."""


def final_points(client: MlflowClient, run_id: str, keys: list[str]) -> list[Metric]:
    """The last logged point of each of `keys` (its largest step, the latest at that step)."""
    return [max(h, key=lambda m: (m.step, m.timestamp)) for h in metric_histories(client, run_id, sorted(keys)) if h]


def load_logged_model(uri: str, tracking_uri: str, *, trust_code: bool = False,
                      model_fn: Callable[..., torch.nn.Module] | None = None, trust_pickle: bool = False) -> torch.nn.Module:
    """A model logged with `log_final_model`, by `runs:/RUN_ID/model` or `models:/NAME/VERSION`, rebuilt
    from its weights-only state dict and config. `trust_pickle`: unpickle the MLflow model instead
    (it can run code)."""
    mlflow.set_tracking_uri(tracking_uri)
    if trust_pickle:
        return mlflow.pytorch.load_model(uri, dst_path=None)
    client = MlflowClient(tracking_uri)
    run_id, where = model_folder(client, uri)
    with tempfile.TemporaryDirectory(prefix="openclaw-model-") as d:
        try:
            folder = client.download_artifacts(run_id, where, d)
        except Exception:
            raise no_logged_model(client, run_id, uri, "load its checkpoint instead, or pass trust_pickle=True to "
                                  "unpickle its MLflow model if you trust where it came from") from None
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        weights = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    model = build_from_config(config, f"MLflow model {uri}", trust_code=trust_code, model_fn=model_fn)
    model.load_state_dict(weights)
    return model.eval()
