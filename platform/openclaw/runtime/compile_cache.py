"""The compile cache beside a run's checkpoints (worker process): `torch.compile`'s work survives
restarts and resizes, on this node or a new one (`train.compile.cache: true`).

After an attempt's first step that compiled, each rank saves torch's cache artifacts
(`torch.compiler.save_cache_artifacts`: Inductor's and AOTAutograd's compiled graphs, with their Triton
kernels on GPUs) to `<run_dir>/compile_cache/rank<r>.bin`, and the C++ kernels Inductor built for CPUs
(shared objects, which the artifacts do not carry) to `rank<r>.kernels.tar`, in checkpoint storage
(local or a URI). A later attempt's ranks load them (their own rank's files, else rank 0's) before the
first step, so its compile finds the graphs and kernels built. Artifacts that do not match (another
shape after a resize, another torch or compiler) are simply not hit. Dynamo's tracing is not cached.

Loading runs the code stored there (generated Python and shared objects), so it is off unless the
config turns it on: storage only the run's owner can write.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import time

import torch

from openclaw.data.filesystems import storage_filesystem

log = logging.getLogger("openclaw")

FOLDER = "compile_cache"
MAX_KERNEL_BYTES = 512 * 2 ** 20
"""A node's built CPU kernels beyond this are not saved (the artifacts still are)."""
UNPACKING = ".openclaw-unpack-"
"""The folders in Inductor's cache that kernels are unpacked into before they are linked into place."""


def _inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # private: where Inductor keeps built kernels
    return cache_dir()


class CompileCache:
    def __init__(self, run_dir: str, rank: int):
        self.fs, root = storage_filesystem(run_dir)
        self.folder = posixpath.join(root, FOLDER)
        self.rank, self.saved = rank, False

    def _path(self, rank: int, kind: str = "bin") -> str:
        return posixpath.join(self.folder, f"rank{rank}.{kind}")

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def load(self) -> int:
        """Load this rank's artifacts and kernels (else rank 0's) into torch's caches; returns how many
        artifacts it loaded."""
        for rank in dict.fromkeys((self.rank, 0)):
            blob = self._read(self._path(rank))
            if blob is None:
                continue
            try:
                info = torch.compiler.load_cache_artifacts(blob)
                kernels = self._read(self._path(rank, "kernels.tar"))
                if kernels:
                    _unpack_kernels(kernels, _inductor_cache_dir())
            except Exception as e:  # another torch's format: compile from cold
                log.warning("could not load the compile cache %s (%s); compiling from cold", self._path(rank), e)
                return 0
            return sum(len(v) for v in info.artifacts.values()) if info is not None else 0
        return 0

    def save(self) -> int:
        """Save the artifacts this process compiled or loaded (once an attempt); returns their bytes."""
        if self.saved:
            return 0
        self.saved = True
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return 0
        self.fs.create_dir(self.folder, recursive=True)
        kernels = _pack_kernels(_inductor_cache_dir())
        if kernels:
            self._write(self._path(self.rank, "kernels.tar"), kernels)
        self._write(self._path(self.rank), artifacts[0])  # last: its presence says the kernels are there
        return len(artifacts[0]) + len(kernels or b"")

    def _write(self, path: str, blob: bytes) -> None:
        tmp = path + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(blob)
        self.fs.move(tmp, path)  # whole or not at all: a reader never sees half a file


def _pack_kernels(root: str) -> bytes | None:
    """The shared objects Inductor built under `root` (its CPU kernels), as a tar; None when there are none
    or too many bytes of them."""
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
             if n.endswith(".so") and UNPACKING not in d]  # not another worker's, half unpacked
    if not files or sum(os.path.getsize(f) for f in files) > MAX_KERNEL_BYTES:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            tar.add(f, arcname=os.path.relpath(f, root))
    return buf.getvalue()


def _unpack_kernels(blob: bytes, root: str) -> None:
    """Into Inductor's cache folder, keeping what is there; names confined to it (tarfile's data filter).

    Each file is unpacked beside, then linked into place: it appears whole or not at all. Unpacked in place,
    a worker killed mid-file left a cut-short kernel that every later attempt kept (and Inductor loads a
    kernel it finds), and a node's two workers loading at once rewrote the files the other had just
    written and was reading."""
    os.makedirs(root, exist_ok=True)
    _sweep_unpacking(root)
    aside = tempfile.mkdtemp(prefix=UNPACKING, dir=root)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and not os.path.exists(os.path.join(root, m.name))]
            tar.extractall(aside, members=members, filter="data")
        for member in members:
            target = os.path.join(root, member.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _put(os.path.join(aside, member.name), target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _put(unpacked: str, target: str) -> None:
    """`unpacked` at `target`, whole, keeping a file already there (another worker's, as whole): a link, or
    on a filesystem without links (some FUSE mounts) a rename, which leaves a reader's open file alone."""
    try:
        os.link(unpacked, target)
    except FileExistsError:
        pass
    except OSError:
        if not os.path.exists(target):
            os.replace(unpacked, target)


def _sweep_unpacking(root: str, stale_s: float = 3600.0) -> None:
    """Remove the unpack folders of workers killed mid-unpack (older than `stale_s`: none still at work)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if entry.name.startswith(UNPACKING) and time.time() - entry.stat().st_mtime > stale_s:
                shutil.rmtree(entry.path, ignore_errors=True)
