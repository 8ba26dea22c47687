"""Models and engine state from checkpoint folders (plain torch; workers restore into their engine, the
driver and the SDK rebuild trained models, `openclaw checkpoint consolidate` writes one file).

A model is rebuilt from the checkpoint's own config, then its weights loaded: from `model.pt` for a
whole checkpoint, from the shards (any number, any layout) for a sharded one, in one process without
a process group.

Nothing in a checkpoint runs code unless the caller says so: its config may name a built-in model,
which is built, or a `module:function`, which would be imported and called, so that needs
`trust_code=True` or the caller's own `model_fn`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from openclaw.config import Config
from openclaw.engine.checkpoint import SHARDED, read
from openclaw.engine.models import BUILTIN, build_model
from openclaw.engine.sharded import SHARDS_DIR, load_shards
from openclaw.errors import CheckpointError, UntrustedCodeError

CONSOLIDATED_KEYS = {"model", "config"}


def load_model_dir(directory: str | os.PathLike, *, trust_code: bool = False,
                   model_fn: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The trained model of a checkpoint folder (whole or sharded), in eval mode, after its manifest check."""
    parts = read(directory)
    model = build_from_config(parts["config"], str(directory), trust_code=trust_code, model_fn=model_fn)
    if parts["manifest"]["format"] == SHARDED:
        weights = model.state_dict()  # the whole model's names: what every layout saves its shards under
        load_shards({"model": weights}, Path(directory) / SHARDS_DIR)
    else:
        weights = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return model.eval()


def consolidate(directory: str | os.PathLike, out: str | os.PathLike, *, trust_code: bool = False) -> Path:
    """One file with the model's whole weights and its config, loadable with `weights_only`."""
    model = load_model_dir(directory, trust_code=trust_code)
    config = read(directory)["config"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config}, out)
    return out


def load_model_file(path: str | os.PathLike, *, trust_code: bool = False,
                    model_fn: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A model from a `consolidate`d file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a model file written by `openclaw checkpoint consolidate` ({e}).") from None
    if not isinstance(saved, dict) or set(saved) != CONSOLIDATED_KEYS:
        raise CheckpointError(f"{path} is not a model file written by `openclaw checkpoint consolidate`.")
    model = build_from_config(saved["config"], str(path), trust_code=trust_code, model_fn=model_fn)
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


def build_from_config(config: dict[str, Any], source: str, *, trust_code: bool = False,
                      model_fn: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The (untrained) model a saved config names: a built-in one, `model_fn(**kwargs)`, or, only with
    `trust_code`, the `module:function` it names."""
    cfg = Config.model_validate(config)
    name, kwargs = cfg.model.name, cfg.model.kwargs
    if model_fn is not None:
        return model_fn(**kwargs)
    if name in BUILTIN or trust_code:
        return build_model(name, kwargs)
    raise UntrustedCodeError(
        f"{source} names the model `{name}`: building it would import {name.split(':')[0]!r} and run its code. "
        f"If you trust where it came from, pass trust_code=True (`--trust-code` on the command line); or pass "
        f"model_fn=<your function that builds the model>, which is called with the saved `model.kwargs`.")
