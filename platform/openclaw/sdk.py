"""The Python SDK: load_config, train and load_model."""
from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from openclaw.engine import checkpoint as ckpt_io
from openclaw.constants import default_tracking_uri
from openclaw.config import Config, load_config
from openclaw.errors import CheckpointError
from openclaw.engine.models import build_model


def train(config: Config | str | os.PathLike, *, overrides: list[str] | None = None, address: str | None = None,
          verbose: bool = False):
    """Train to the end. Returns a `TrainResult` with `run_id`, `checkpoint` and final `metrics`."""
    from openclaw.launch.session import train as _train
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return _train(config, address=address, verbose=verbose)


def sweep(config: Config | str | os.PathLike, *, overrides: list[str] | None = None, resume: bool = False,
          address: str | None = None, verbose: bool = False):
    """Run the config's `sweep:` (or continue it, with `resume`). Returns a `SweepResult`: the parent run
    id, the best trial (its run, metric and params) and every trial's outcome."""
    from openclaw.sweep.launch import sweep as _sweep
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return _sweep(config, resume=resume, address=address, verbose=verbose)


def model_from_checkpoint_dir(directory: str | os.PathLike) -> nn.Module:
    parts = ckpt_io.load(directory)
    cfg = Config.model_validate(parts["config"])
    model = build_model(cfg.model.name, cfg.model.kwargs)
    model.load_state_dict(parts["model"])
    return model.eval()


def load_model(source: str | os.PathLike, *, tracking_uri: str | None = None) -> nn.Module:
    """The trained `torch.nn.Module` from any of:

    - a checkpoint folder or URI (a `TrainResult.checkpoint`), loaded with `weights_only` after its
      manifest check;
    - an MLflow run id (its logged `model`), or a `runs:/RUN_ID/model` or `models:/NAME/VERSION` URI,
      from `tracking_uri` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
    """
    path = str(source)
    if path.startswith(("models:/", "runs:/")) or (RUN_ID.fullmatch(path) and not Path(path).exists()):
        return _from_mlflow(path if ":/" in path else f"runs:/{path}/model", tracking_uri)
    if "://" in path:
        from ray.train import Checkpoint
        with Checkpoint(path).as_directory() as d:
            return model_from_checkpoint_dir(d)
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint folder nor an MLflow model; pass the `checkpoint` or "
                              f"`run_id` of a TrainResult, a checkpoint_* folder, or models:/NAME/VERSION.")
    return model_from_checkpoint_dir(path)


RUN_ID = re.compile(r"[0-9a-f]{32}")


def _from_mlflow(uri: str, tracking_uri: str | None) -> nn.Module:
    import mlflow.pytorch
    where = tracking_uri or default_tracking_uri()
    try:
        mlflow.set_tracking_uri(where)
        model = mlflow.pytorch.load_model(uri, dst_path=None)
    except Exception as e:
        raise CheckpointError(f"could not load MLflow model {uri} from {where}: {str(e).splitlines()[0]}. Check the "
                              f"run id or model name and version, and `tracking_uri`.") from None
    return model  # logged in eval mode; MLflow may return an exported program, which has no .eval()
