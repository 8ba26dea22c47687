"""A run's checkpoints in its storage folder, as the workers see them (worker process): listing them
newest first, publishing files into a checkpoint folder (the manifest last), and restoring the newest
checkpoint that every rank finds valid.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from openclaw.data.filesystems import storage_filesystem, storage_uri
from openclaw.engine import checkpoint as ckpt_io
from openclaw.engine.model_io import restore_engine
from openclaw.errors import CheckpointError
from openclaw.runtime.ray_private import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

log = logging.getLogger("openclaw")


def checkpoints_newest_first(run_dir: str) -> list[Checkpoint]:
    """Every `checkpoint_*` folder of a run (local path or URI), newest first (`listed`)."""
    return [checkpoint for checkpoint, _ in listed(run_dir)]


def listed(run_dir: str) -> list[tuple[Checkpoint, int | None]]:
    """Every `checkpoint_*` folder of a run with the step its manifest records (None: no readable
    manifest, a folder not written in full), newest first: by step, then by name, the time it was
    written. Names alone misorder: a folder named in local time sorted a checkpoint written after a
    daylight-saving change, or by rank 0 on a node in another time zone, before older ones."""
    fs, root = storage_filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dirs = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    steps = {path: _manifest_step(fs, path) for path in dirs}
    order = sorted(dirs, key=lambda p: (steps[p] is not None, steps[p] or 0, os.path.basename(p)), reverse=True)
    return [(Checkpoint(path, filesystem=fs), steps[path]) for path in order]


def _manifest_step(fs: pafs.FileSystem, folder: str) -> int | None:
    try:
        with fs.open_input_stream(f"{folder}/{ckpt_io.MANIFEST}") as f:
            step = json.loads(f.read()).get("step")
    except (OSError, ValueError, AttributeError):  # not written in full, or not a manifest
        return None
    return ckpt_io.ordering_step(step)


def newest_finished_file(run_dir: str, name: str) -> tuple[str, bytes] | None:
    """(checkpoint path, the bytes of its file `name`) from the run's newest checkpoint written in full (its
    manifest there) whose file reads, or None. One small file, not a restore: `state.pt`, `config.json`."""
    for candidate in checkpoints_newest_first(run_dir):
        fs, folder = candidate.filesystem, candidate.path.rstrip("/")
        try:
            if fs.get_file_info(f"{folder}/{ckpt_io.MANIFEST}").type != pafs.FileType.File:
                continue  # not written in full
            with fs.open_input_stream(f"{folder}/{name}") as f:
                return folder, f.read()
        except Exception:  # unreadable: the restore will skip it too; try an older one
            continue
    return None


def restore(run_dir: str, tracker, engine, accept: Callable[[dict[str, Any], str], None]) -> dict[str, Any] | None:
    """Load the newest checkpoint of the run's folder that passes its manifest check on every rank into
    `engine`; returns its {"state", "config", "manifest", "trainer", "path"}, or None if there is none.

    The folder is scanned rather than trusting `ray.train.get_checkpoint()` alone: a worker can die
    after rank 0's report returned but before Ray's controller registered that checkpoint, and the
    metrics published with it must not be replayed. Invalid (partial, truncated, corrupt) checkpoints
    are reported and skipped in favour of the next newest; the ranks agree on each verdict, so that
    they all load the same one. `accept(state, path)` may refuse a valid checkpoint for good (the data
    changed under the run) by raising. Rank 0 lists the folder for every rank: a rollback can come while
    a background save is creating a checkpoint folder, and ranks listing at different moments would
    walk different lists, their verdicts paired to different checkpoints.
    """
    for candidate in _listed_by_rank0(run_dir, engine.device):
        uri = storage_uri(run_dir, candidate.path)
        with candidate.as_directory() as d:
            parts, problem = None, None
            try:
                parts = ckpt_io.read(d)
            except CheckpointError as e:
                problem = str(e)
            if not _all_ranks_agree(parts is not None, engine.device):
                _skip(tracker, uri, problem or "another rank found it invalid")
                continue
            accept(parts["state"], uri)
            restore_engine(engine, d, parts)
        return parts | {"path": uri}
    return None


def _listed_by_rank0(run_dir: str, device: torch.device) -> list[Checkpoint]:
    """`checkpoints_newest_first` as rank 0 lists it, on every rank (one broadcast of the paths)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return checkpoints_newest_first(run_dir)
    listed = [[c.path for c in checkpoints_newest_first(run_dir)] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(listed, src=0, device=device)
    fs, _ = storage_filesystem(run_dir)
    return [Checkpoint(path, filesystem=fs) for path in listed[0]]


def _all_ranks_agree(ok: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _skip(tracker, path: str, reason: str) -> None:
    msg = f"skipping invalid checkpoint: {reason}"
    log.warning(msg)
    tracker.event("checkpoint_invalid", checkpoint=path, reason=reason)
    tracker.progress({"message": msg})


def checkpoint_dir_name() -> str:
    """A new checkpoint folder's name, by the time in UTC, as Ray's format (so that names sort oldest first
    whatever the time zone of the node that writes it, and across a daylight-saving change)."""
    return "checkpoint_" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H-%M-%S.%f")


def publish_dir(local: str, run_dir: str) -> str:
    """Copy a written checkpoint folder into the run's storage, manifest last; return its path there."""
    fs, root = storage_filesystem(run_dir)
    dest = f"{root.rstrip('/')}/{checkpoint_dir_name()}"
    names = sorted(os.listdir(local), key=lambda n: n == ckpt_io.MANIFEST)  # the manifest goes last
    publish(local, names, fs, dest)
    return dest


def publish(local: str, names: list[str], fs: pafs.FileSystem, dest: str) -> dict[str, dict[str, Any]]:
    """Copy `names` (relative to `local`, sub-folders included) into `dest` on `fs`, in order; returns
    each file's manifest entry (size and sha256)."""
    infos = {}
    for name in names:
        target = f"{dest.rstrip('/')}/{name}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, 8 << 20)
        infos[name] = ckpt_io.file_info(local, name)
    return infos


def publish_manifest(fs: pafs.FileSystem, dest: str, step: int, fmt: str, files: dict[str, dict]) -> None:
    """The manifest of a checkpoint whose files are all in `dest` already: written last."""
    with tempfile.TemporaryDirectory(prefix="openclaw-manifest-") as d:
        ckpt_io.write_manifest(d, step, fmt, files)
        publish(d, [ckpt_io.MANIFEST], fs, dest)


def files_under(folder: str | os.PathLike) -> list[str]:
    """Every file below `folder`, as relative names."""
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def to_host(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to host memory: training can go on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def prune(run_dir: str, keep: int, loaded: str | None = None) -> list[str]:
    """Rank 0, when an attempt starts: count the checkpoints Ray Train never registered (a background
    checkpoint published just before a worker died) toward `keep`, and remove those of them that fall
    outside it, with unfinished folders. Ray deletes the ones it tracks itself, and fails the run if one
    is gone already, so those are never touched here; nor is anything newer than the newest checkpoint
    Ray tracks, which Ray may still be about to register (it registers reports in order); nor `loaded`,
    the one this attempt restored (newer ones may have failed their check and been skipped)."""
    candidates = listed(run_dir)
    if not candidates:
        return []
    fs = candidates[0][0].filesystem
    tracked = ray_tracked(fs, candidates[0][0].path.rsplit("/", 1)[0])
    if not tracked:
        return []
    newest_tracked = max(tracked)
    tracked_steps = [s for c, s in candidates if os.path.basename(c.path) in tracked and s is not None]
    newest_step = max(tracked_steps, default=-1)
    finished = [(c.path, s) for c, s in candidates if s is not None]
    unfinished = [c.path for c, s in candidates if s is None]
    kept = {os.path.basename(loaded.rstrip("/"))} | tracked if loaded else tracked
    doomed = [p for p, s in finished[keep:] if os.path.basename(p) not in kept and s < newest_step]
    doomed += [p for p in unfinished if os.path.basename(p) not in kept and os.path.basename(p) < newest_tracked]
    for path in doomed:
        try:
            fs.delete_dir(path)
        except OSError:
            pass
    return doomed


def ray_tracked(fs: pafs.FileSystem, run_root: str) -> set[str]:
    """The checkpoint folder names Ray Train's checkpoint manager tracks for this run (empty if it has
    registered none yet, or its record cannot be read: then nothing is pruned)."""
    try:
        with fs.open_input_stream(f"{run_root}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}") as f:
            snapshot = json.loads(f.read())
    except (OSError, ValueError):
        return set()
    names: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            name = node.get("checkpoint_dir_name")
            if isinstance(name, str):
                names.add(name)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
    collect(snapshot)
    return names
