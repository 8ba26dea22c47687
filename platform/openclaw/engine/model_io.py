"""Models and engine state from checkpoint folders (plain torch; workers restore into their engine, the
driver and the SDK rebuild trained models, `openclaw checkpoint consolidate` writes one file).

A model is rebuilt from the checkpoint's own config, then its weights loaded: from `model.pt` for a
whole checkpoint, from the shards (any number, any layout) for a sharded one, in one process without
a process group.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openclaw.config import Config
from openclaw.engine.checkpoint import SHARDED, read
from openclaw.engine.models import build_model
from openclaw.engine.sharded import SHARDS_DIR, load_shards
from openclaw.errors import CheckpointError

CONSOLIDATED_KEYS = {"model", "config"}


def load_model_dir(directory: str | os.PathLike) -> nn.Module:
    """The trained model of a checkpoint folder (whole or sharded), in eval mode, after its manifest check."""
    parts = read(directory)
    model = _build(parts["config"])
    if parts["manifest"]["format"] == SHARDED:
        weights = model.state_dict()  # the whole model's names: what every layout saves its shards under
        load_shards({"model": weights}, Path(directory) / SHARDS_DIR)
    else:
        weights = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return model.eval()


def consolidate(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """One file with the model's whole weights and its config, loadable with `weights_only`."""
    model = load_model_dir(directory)
    config = read(directory)["config"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config}, out)
    return out


def load_model_file(path: str | os.PathLike) -> nn.Module:
    """A model from a `consolidate`d file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a model file written by `openclaw checkpoint consolidate` ({e}).") from None
    if not isinstance(saved, dict) or set(saved) != CONSOLIDATED_KEYS:
        raise CheckpointError(f"{path} is not a model file written by `openclaw checkpoint consolidate`.")
    model = _build(saved["config"])
    model.load_state_dict(saved["model"])
    return model.eval()


def restore_engine(engine, directory: str | os.PathLike, parts: dict[str, Any]) -> None:
    """Load a checkpoint's model, optimizer and grad scaler into a live engine, at its own layout."""
    sharded = parts["manifest"]["format"] == SHARDED
    if sharded != engine.strategy.sharded:
        raise CheckpointError(f"checkpoint {directory} was written {'sharded' if sharded else 'whole'}, but the run's "
                              f"`parallelism.strategy` ({engine.strategy.name}) keeps its state "
                              f"{'sharded' if engine.strategy.sharded else 'whole'}; resume with the strategy that "
                              f"wrote it, or start a new run (`name`).")
    if sharded:
        state = engine.strategy.state_dict(engine.model, engine.optimizer)
        load_shards(state, Path(directory) / SHARDS_DIR)
        engine.load_state_dict({**state, "scaler": parts["trainer"].get("scaler")})
    else:
        model = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
        engine.load_state_dict({"model": model, **parts["trainer"]})


def _build(config: dict[str, Any]) -> nn.Module:
    cfg = Config.model_validate(config)
    return build_model(cfg.model.name, cfg.model.kwargs)
