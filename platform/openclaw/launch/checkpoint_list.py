"""`openclaw checkpoint list` (driver): a run's checkpoints, newest first, each with its step, format,
size and whether a resume would take it, and which one the same command would resume from.

A resume takes the newest checkpoint whose files all match its manifest (`runtime.checkpoint_store`);
this says which, before anything starts: every file's size and sha256 checked as a resume checks them,
read through the folder's filesystem (a local folder or a URI, streamed: nothing is written), or with
`quick` the sizes alone, from the listing (nothing read).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from openclaw.data.filesystems import storage_filesystem
from openclaw.engine import checkpoint as ckpt_io
from openclaw.errors import CheckpointError, ConfigError
from openclaw.tracking.redact import public_uri


@dataclass
class Listed:
    """One checkpoint folder of a run."""
    name: str
    step: int | None
    format: str | None
    files: int
    size: int
    problem: str | None
    """Why a resume would skip it (None: valid)."""


def list_checkpoints(run_dir: str, quick: bool = False) -> list[Listed]:
    """The `checkpoint_*` folders of `run_dir` (a local folder or URI), newest first (Ray names them by
    time), each checked (`quick`: sizes only); a `ConfigError` where there is no such folder or it holds
    none."""
    fs, root, info = _opened(run_dir)
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"there is no run folder at {run_dir}: pass `<checkpoint.storage>/<name>` of a run (the "
                          f"folder its checkpoints are written in).")
    if fs.get_file_info(f"{root.rstrip('/')}/{ckpt_io.MANIFEST}").type == pafs.FileType.File:
        raise ConfigError(f"{run_dir} is one checkpoint, not a run's folder: pass the folder that holds it.")
    names = sorted((i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                    if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    if not names:
        runs = _runs_under(fs, root)
        raise ConfigError(f"{run_dir} holds no checkpoint_* folder: the run wrote none (yet), or this is not its "
                          f"folder (`<checkpoint.storage>/<name>`)." +
                          (f" It holds the runs {', '.join(runs)}: pass one of them." if runs else ""))
    checked = [_check(fs, f"{root.rstrip('/')}/{name}", name, quick) for name in names]
    # newest first as a resume walks them (`runtime.checkpoint_store.listed`): by step, then by name
    return sorted(checked, key=lambda c: (c.step is not None, ckpt_io.ordering_step(c.step), c.name), reverse=True)


def is_one_checkpoint(uri: str) -> bool:
    """Whether `uri` (a folder or URI) holds one checkpoint (its manifest); a ConfigError where it cannot
    be read."""
    fs, root, _ = _opened(uri)
    return fs.get_file_info(f"{root.rstrip('/')}/{ckpt_io.MANIFEST}").type == pafs.FileType.File


def _opened(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """`uri`'s filesystem, its path there and what is at it; a ConfigError where it cannot be read (a store
    that does not answer, a bucket that is not there, a URI that does not parse)."""
    try:
        fs, root = storage_filesystem(uri if "://" in uri else os.path.abspath(uri))
        return fs, root, fs.get_file_info(root)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"cannot read {public_uri(uri)} ({' '.join(str(e).split())}): check the path, and for a "
                          f"URI the bucket, the endpoint (`data.s3` / AWS_ENDPOINT_URL) and the credentials.") from None


def _runs_under(fs: pafs.FileSystem, root: str) -> list[str]:
    """The folders in `root` that hold checkpoints (`root` is a `checkpoint.storage`): its runs."""
    def holds_checkpoints(folder: str) -> bool:
        return any(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                   for i in fs.get_file_info(pafs.FileSelector(folder)))
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                  if i.type == pafs.FileType.Directory and holds_checkpoints(i.path))


def _check(fs: pafs.FileSystem, folder: str, name: str, quick: bool) -> Listed:
    try:
        with fs.open_input_stream(f"{folder}/{ckpt_io.MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return Listed(name, None, None, 0, 0, f"no {ckpt_io.MANIFEST}: not written in full")
    except (OSError, ValueError) as e:
        return Listed(name, None, None, 0, 0, f"{ckpt_io.MANIFEST} unreadable ({e})")
    problem = ckpt_io.manifest_problem(manifest)  # as the resume judges it
    if problem:
        return Listed(name, None, None, 0, 0, f"{ckpt_io.MANIFEST} {problem}")
    files = manifest["files"]
    listed = Listed(name, manifest.get("step"), manifest.get("format", ckpt_io.WHOLE), len(files),
                    sum(f["size"] for f in files.values()), None)
    try:
        _matches(fs, folder, files, quick)
    except CheckpointError as e:
        listed.problem = str(e)
    except FileNotFoundError:  # deleted while we read it (Ray Train keeps `checkpoint.keep` of a live run)
        listed.problem = "deleted while it was being checked"
    return listed


def _matches(fs: pafs.FileSystem, folder: str, files: dict[str, dict], quick: bool) -> None:
    """The resume's check of every file the manifest names (`engine.checkpoint.check_files`), through the
    folder's filesystem: sizes from one listing, and (unless `quick`) each file's sha256, streamed."""
    for name in files:  # a name outside the folder is refused, as a resume refuses it
        ckpt_io.inside(Path(folder), name)
    infos = dict(zip(files, fs.get_file_info([f"{folder}/{name}" for name in files])))
    ckpt_io.check_files("", files, lambda name: infos[name].size if infos[name].type == pafs.FileType.File else None,
                        None if quick else lambda name: _sha256(fs, f"{folder}/{name}"))


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def table(run_dir: str, listed: list[Listed], quick: bool = False) -> str:
    """The listing as the command prints it: one line per checkpoint, the one a resume takes marked."""
    resume = next((c.name for c in listed if c.problem is None), None)
    how = "each file's size checked against its manifest (--quick: no sha256 read; a resume reads them)" if quick \
        else "every file checked against its manifest (size and sha256), as a resume checks it"
    width = max(len(c.name) for c in listed)
    lines = [f"{'checkpoint':<{width}}  {'step':>7}  {'format':<7}  {'files':>5}  {'MB':>9}  state"]
    for c in listed:
        mark = ("  <- a resume starts here" + (", if its files' sha256 match" if quick else "")) if c.name == resume else ""
        state = ("sizes ok" if quick else "ok") + mark if c.problem is None else f"skipped on resume: {c.problem}"
        step = "-" if c.step is None else str(c.step)
        lines.append(f"{c.name:<{width}}  {step:>7}  {c.format or '-':<7}  {c.files:>5}  {c.size / 1e6:>9.2f}  {state}")
    lines.append(f"{len(listed)} checkpoint(s) in {run_dir}; {how}." +
                 ("" if resume else " None is valid: a resume would start over."))
    return "\n".join(lines)
