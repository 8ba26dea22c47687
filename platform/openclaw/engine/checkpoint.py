"""Checkpoint files (plain torch; workers write and read them, the driver and the SDK load models from
them): written in full, then a manifest (size and sha256 of every file) written last.

A checkpoint folder is valid only if its manifest exists and every file matches it, so a truncated or
corrupt checkpoint is detected on load instead of crashing (or silently diverging) later. Loading uses
``torch.load(weights_only=True)``, and sharded parts go through `engine.sharded`'s safe reader: a
checkpoint cannot run code. File names in a manifest are relative and stay inside the folder.

Two layouts, named by the manifest's `format`::

    whole (DDP: rank 0 writes)            sharded (FSDP, TP, PP: every rank writes its shards)
    model.pt    model state_dict           model/      torch.distributed.checkpoint: .metadata and
    trainer.pt  optimizer + grad scaler                __<rank>_0.distcp (model and optimizer, by name)
                                           trainer.pt  grad scaler
    state.pt     the TrainState (step, data position, world size, run id, ...)
    config.json  the resolved config, so a checkpoint alone rebuilds its model
    manifest.json  {"format": ..., "step": int, "files": {relative name: {"size", "sha256"}}}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from openclaw.errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
WHOLE, SHARDED = "whole", "sharded"
HOLDS = {WHOLE: ("model.pt", "trainer.pt", "state.pt", "config.json"),
         SHARDED: ("model/.metadata", "trainer.pt", "state.pt", "config.json")}
"""The files a checkpoint of each format holds, which its manifest must list (`engine.sharded.SHARDS_DIR`
is `model`): one that left `model.pt` out passed, cut short, and the resume failed on it every attempt."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_info(directory: str | os.PathLike, name: str) -> dict[str, Any]:
    p = Path(directory) / name
    return {"size": p.stat().st_size, "sha256": sha256(p)}


def save(directory: str | os.PathLike, *, model: dict, trainer: dict, state: dict, config: dict) -> Path:
    """A whole checkpoint: every file, then the manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model, d / "model.pt")
    save_small(d, trainer=trainer, state=state, config=config)
    write_manifest(d, state.get("step"), WHOLE, {n: file_info(d, n) for n in ("model.pt", *SMALL)})
    return d


SMALL = ("trainer.pt", "state.pt", "config.json")


def save_small(directory: Path, *, trainer: dict, state: dict, config: dict) -> None:
    """The files every layout has, written by rank 0."""
    torch.save(trainer, directory / "trainer.pt")
    torch.save(state, directory / "state.pt")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def ordering_step(step: object) -> int:
    """The step a resume orders a checkpoint by: its manifest's, or -1 (after every other) where that is
    no whole number."""
    return step if isinstance(step, int) else -1


def write_manifest(directory: str | os.PathLike, step: int | None, fmt: str, files: dict[str, dict]) -> None:
    """Last, and atomically: the manifest appears only once everything it lists is on disk."""
    d = Path(directory)
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": fmt, "step": step, "files": files}, indent=2, sort_keys=True))
    os.replace(tmp, d / MANIFEST)


def inside(directory: Path, name: str) -> Path:
    """`directory / name` for a relative name that stays inside it; a `CheckpointError` otherwise."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise CheckpointError(f"checkpoint {directory}: its manifest names {name!r}, which is not a file inside it.")
    return directory / name


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise `CheckpointError`."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        whole = sorted(c.name for c in d.glob("checkpoint_*") if (c / MANIFEST).is_file())
        if whole:  # the run's folder, which holds its checkpoints
            raise ConfigError(f"{d} is a run's folder, not one checkpoint: pass one of its checkpoint_* folders "
                              f"(the newest written in full is {d / whole[-1]}).") from None
        raise CheckpointError(f"checkpoint {d} has no {MANIFEST}: it was not written in full.") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"checkpoint {d}: {MANIFEST} is corrupt ({e}).") from None
    problem = manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint {d}: {MANIFEST} {problem}.")

    def size(name: str) -> int | None:
        p = inside(d, name)
        if p.is_symlink() or not p.resolve().is_relative_to(d.resolve()):  # (a name inside, leading out)
            raise CheckpointError(f"checkpoint {d}: {name} leads outside it (a symbolic link).")
        return p.stat().st_size if p.is_file() else None
    check_files(f"checkpoint {d}: ", manifest["files"], size, lambda name: sha256(inside(d, name)))
    manifest.setdefault("format", WHOLE)
    return manifest


def manifest_problem(manifest: Any) -> str | None:
    """What makes a manifest (parsed JSON) one a resume refuses, said after its name; None where nothing
    does. The resume's check and `openclaw checkpoint list`'s."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not all(
            isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
            for v in manifest["files"].values()):
        return "is malformed (no `files` mapping each name to its size, a whole number, and sha256)"
    fmt = manifest.get("format", WHOLE)
    if not isinstance(fmt, str) or fmt not in HOLDS:
        return f"names the format {fmt!r}, not {WHOLE!r} or {SHARDED!r}"
    unlisted = [name for name in HOLDS[fmt] if name not in manifest["files"]]
    if unlisted:
        return f"does not list {', '.join(unlisted)}, which a {fmt} checkpoint holds"
    return None


def check_files(where: str, files: dict[str, dict], size: Callable[[str], int | None],
                digest: Callable[[str], str] | None) -> None:
    """Every file a manifest names (`files`) there, with its size and, unless `digest` is None, its sha256;
    a `CheckpointError` (prefixed `where`) naming the first that is not. `size(name)`: its bytes, None
    where it is missing; `digest(name)`: its sha256 (a local folder's, or one read through a filesystem)."""
    for name, want in files.items():
        got = size(name)
        if got is None:
            raise CheckpointError(f"{where}{name} is missing.")
        if got != want["size"]:
            raise CheckpointError(f"{where}{name} is {got} bytes, the manifest says {want['size']} "
                                  f"(truncated or overwritten).")
        if digest is not None and digest(name) != want["sha256"]:
            raise CheckpointError(f"{where}{name} fails its sha256 check (corrupt).")


def read(directory: str | os.PathLike) -> dict[str, Any]:
    """Verify, then read what every layout has: {"manifest", "state", "trainer", "config"}."""
    d = Path(directory)
    manifest = verify(d)
    return {"manifest": manifest,
            "trainer": torch.load(d / "trainer.pt", map_location="cpu", weights_only=True),
            "state": torch.load(d / "state.pt", map_location="cpu", weights_only=True),
            "config": json.loads((d / "config.json").read_text())}


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load a whole checkpoint's parts. Never unpickles arbitrary objects."""
    parts = read(directory)
    if parts["manifest"]["format"] != WHOLE:
        raise CheckpointError(f"checkpoint {directory} is sharded; load it with `openclaw.load_model`, or resume "
                              f"with the run's `parallelism` settings.")
    return {**parts, "model": torch.load(Path(directory) / "model.pt", map_location=map_location, weights_only=True)}
