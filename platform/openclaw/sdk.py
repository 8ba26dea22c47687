"""The Python SDK: load_config, train and load_model."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from openclaw import checkpoint as ckpt_io
from openclaw.config import Config, load_config
from openclaw.errors import CheckpointError
from openclaw.models import build_model


def train(config: Config | str | os.PathLike, *, overrides: list[str] | None = None, address: str | None = None,
          verbose: bool = False):
    """Train to the end. Returns a `TrainResult` with `run_id`, `checkpoint` and final `metrics`."""
    from openclaw.launch import train as _train
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return _train(config, address=address, verbose=verbose)


def model_from_checkpoint_dir(directory: str | os.PathLike) -> nn.Module:
    parts = ckpt_io.load(directory)
    cfg = Config.model_validate(parts["config"])
    model = build_model(cfg.model.name, cfg.model.kwargs)
    model.load_state_dict(parts["model"])
    return model.eval()


def load_model(checkpoint: str | os.PathLike) -> nn.Module:
    """The trained `torch.nn.Module` from a checkpoint folder (or a `TrainResult.checkpoint` path/URI)."""
    path = str(checkpoint)
    if "://" in path:
        from ray.train import Checkpoint
        with Checkpoint(path).as_directory() as d:
            return model_from_checkpoint_dir(d)
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder; pass the `checkpoint` of a TrainResult, or a "
                              f"checkpoint_* folder under the run's storage path.")
    return model_from_checkpoint_dir(path)
