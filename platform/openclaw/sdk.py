"""The Python SDK (driver): `train`, `sweep`, `load_model` and `export`, re-exported as `openclaw.train` etc."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from openclaw.config import Config, load_config, with_overrides
from openclaw.constants import default_tracking_uri
from openclaw.data.filesystems import local_copy
from openclaw.engine.model_io import load_model_dir, load_model_file
from openclaw.errors import CheckpointError, ConfigError, UntrustedCodeError
from openclaw.exports.files import is_export, load_export
from openclaw.exports.run import ExportResult
from openclaw.exports.run import export as _export
from openclaw.launch.session import TrainResult
from openclaw.launch.session import train as _train
from openclaw.sweeps.launch import SweepResult
from openclaw.sweeps.launch import sweep as _sweep
from openclaw.tracking.model import load_logged_model
from openclaw.tracking.run import RUN_ID_PATTERN, logged_export
from openclaw.tracking.writer import read_events

def train(config: Config | str | os.PathLike, *, overrides: list[str] | None = None, address: str | None = None,
          verbose: bool = False) -> TrainResult:
    """Train to the end. Returns a `TrainResult` with `run_id`, `checkpoint` and final `metrics`."""
    config = with_overrides(config, overrides) if isinstance(config, Config) else load_config(config, overrides)
    return _train(config, address=address, verbose=verbose)


def sweep(config: Config | str | os.PathLike, *, overrides: list[str] | None = None, resume: bool = False,
          address: str | None = None, verbose: bool = False) -> SweepResult:
    """Run the config's `sweep:` (or continue it, with `resume`). Returns a `SweepResult`: the parent run
    id, the best trial (its run, metric and params) and every trial's outcome."""
    config = with_overrides(config, overrides) if isinstance(config, Config) else load_config(config, overrides)
    return _sweep(config, resume=resume, address=address, verbose=verbose)


def load_model(source: str | os.PathLike, *, tracking_uri: str | None = None, trust_code: bool = False,
               model_fn: Callable[..., nn.Module] | None = None, trust_pickle: bool = False) -> nn.Module:
    """The trained `torch.nn.Module` from any of:

    - a checkpoint folder or URI (a `TrainResult.checkpoint`), whole or sharded, loaded with
      `weights_only` after its manifest check;
    - a file written by `openclaw checkpoint consolidate`, or a folder written by `openclaw export`
      (its quantized model);
    - an MLflow run id (its logged `model`), or a `runs:/RUN_ID/model` or `models:/NAME/VERSION` URI,
      from `tracking_uri` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db), rebuilt from the
      state dict and config openclaw logs beside the MLflow model, each logged model its own (nothing
      is unpickled unless `trust_pickle=True`, which loads the MLflow model itself: for a run with
      data, MLflow's torch.export program traced on two rows, which takes the example's shapes
      beyond the batch, and is not an `nn.Module` you can `.eval()`).

    Nothing runs code unless you say so: a built-in model is built; a `module:function` model named by
    the checkpoint needs `trust_code=True`, or your own `model_fn`, called with its `model.kwargs`.
    """
    trust = {"trust_code": trust_code, "model_fn": model_fn}
    path = str(source)
    if path.startswith(("models:/", "runs:/")) or (RUN_ID_PATTERN.fullmatch(path) and not Path(path).exists()):
        return _from_mlflow(path if ":/" in path else f"runs:/{path}/model", tracking_uri,
                            trust_pickle=trust_pickle, **trust)
    if "://" in path:
        with local_copy(path) as d:
            return load_model_dir(d, **trust)
    if Path(path).is_file():
        return load_model_file(path, **trust)
    if is_export(path):  # a quantized export (`openclaw export`)
        return load_export(path, **trust)
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint folder nor an MLflow model; pass the `checkpoint` or "
                              f"`run_id` of a TrainResult, a checkpoint_* folder, or models:/NAME/VERSION.")
    return load_model_dir(path, **trust)


def export(source: str | os.PathLike, *, quantize: str, group_size: int | None = None, evaluate: bool = False,
           out: str | os.PathLike | None = None, register: str | None = None, tracking_uri: str | None = None,
           device: str = "cpu", trust_code: bool = False, model_fn: Callable[..., nn.Module] | None = None) -> ExportResult:
    """Quantize a trained model (`int8`, `int8-dynamic` or `int4`) from a checkpoint, a run id or
    models:/NAME/VERSION; save it (load it with `load_model(result.out)`), measure size, memory, latency
    and, with `evaluate`, quality against the full model, and record it as a child MLflow run of the
    source run (and a registered model version with `register`). Needs `pip install 'openclaw[quantize]'`."""
    return _export(source, quantize=quantize, group_size=group_size, evaluate=evaluate, out=out, register=register,
                   tracking_uri=tracking_uri, device=device, trust_code=trust_code, model_fn=model_fn)


def events(run_id: str, *, tracking_uri: str | None = None) -> list[dict]:
    """A run's events, in order, while it runs or after: each start, resume, restart and resize (with its
    world size and the step it resumed from), checkpoint, checkpoint request, skipped batch and failure,
    each with `event`, `t` (epoch seconds) and `time`. Reads from `tracking_uri` (default:
    $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from mlflow.tracking import MlflowClient
    return read_events(MlflowClient(tracking_uri or default_tracking_uri()), run_id)


def _from_mlflow(uri: str, tracking_uri: str | None, trust_pickle: bool, **trust) -> nn.Module:
    where = tracking_uri or default_tracking_uri()
    try:
        with logged_export(uri, where) as folder:
            if folder is not None:  # a registered `openclaw export`
                return load_export(folder, **trust)
        return load_logged_model(uri, where, trust_pickle=trust_pickle, **trust)  # logged in eval mode
    except (CheckpointError, UntrustedCodeError):
        raise
    except ConfigError as e:  # no such run or model version, or a run with no model: said once, as the SDK's error
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f"could not load MLflow model {uri} from {where}: {str(e).splitlines()[0]}. Check the "
                              f"run id or model name and version, and `tracking_uri`.") from None
