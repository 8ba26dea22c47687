"""Checkpoint files: written in full, then a manifest (sizes and sha256 of every file) written last; and
the model rebuilt from a checkpoint folder (plain torch; workers write and read them, the driver and the
SDK load models from them).

A checkpoint directory is valid only if its manifest exists and every file matches it, so a
truncated or corrupt checkpoint is detected on load instead of crashing (or silently diverging)
later. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.

Layout::

    model.pt        model state_dict (unwrapped: loads into a bare model)
    trainer.pt      optimizer and grad-scaler state
    state.pt        the TrainState (step, data position, world size, run id, ...)
    config.json     the resolved config, so a checkpoint alone rebuilds its model
    manifest.json   {"files": {name: {"size": int, "sha256": str}}, "step": int}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from openclaw.config import Config
from openclaw.engine.models import build_model
from openclaw.errors import CheckpointError

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(directory: str | os.PathLike, *, model: dict, trainer: dict, state: dict, config: dict) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model, d / "model.pt")
    torch.save(trainer, d / "trainer.pt")
    torch.save(state, d / "state.pt")
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": state.get("step"), "files": files}, indent=2))
    os.replace(tmp, d / MANIFEST)  # the manifest appears only once everything it lists is on disk
    return d


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise `CheckpointError`."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} has no {MANIFEST}: it was not written in full.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {d}: {MANIFEST} is corrupt ({e}).") from None
    for name, want in manifest["files"].items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing.")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {d}: {name} is {size} bytes, the manifest says {want['size']} "
                                  f"(truncated or overwritten).")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {d}: {name} fails its sha256 check (corrupt).")
    return manifest


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load a checkpoint's parts. Never unpickles arbitrary objects."""
    d = Path(directory)
    verify(d)
    return {
        "model": torch.load(d / "model.pt", map_location=map_location, weights_only=True),
        "trainer": torch.load(d / "trainer.pt", map_location=map_location, weights_only=True),
        "state": torch.load(d / "state.pt", map_location="cpu", weights_only=True),
        "config": json.loads((d / "config.json").read_text()),
    }


def load_model_dir(directory: str | os.PathLike) -> torch.nn.Module:
    """The trained model of a checkpoint folder, in eval mode: rebuilt from the checkpoint's own config,
    its weights loaded after the manifest check."""
    parts = load(directory)
    cfg = Config.model_validate(parts["config"])
    model = build_model(cfg.model.name, cfg.model.kwargs)
    model.load_state_dict(parts["model"])
    return model.eval()
