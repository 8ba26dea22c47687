"""The compile cache beside a run's checkpoints (worker process): `torch.compile`'s work survives
restarts and resizes, on this node or a new one.

After an attempt's first step that compiled, each rank saves torch's cache artifacts
(`torch.compiler.save_cache_artifacts`: Inductor's and AOTAutograd's compiled graphs) to
`<run_dir>/compile_cache/rank<r>.bin`, in checkpoint storage (local or a URI). A later attempt's ranks
load them (their own rank's file, else rank 0's) before the first step, so its compile finds the graphs
in the cache instead of generating and building them again. Artifacts that do not match (another shape
after a resize, another torch) are simply not hit. Dynamo's tracing itself is not cached.
"""
from __future__ import annotations

import logging
import posixpath

import torch

from openclaw.data.filesystems import storage_filesystem

log = logging.getLogger("openclaw")

FOLDER = "compile_cache"


class CompileCache:
    def __init__(self, run_dir: str, rank: int):
        self.fs, root = storage_filesystem(run_dir)
        self.folder = posixpath.join(root, FOLDER)
        self.rank, self.saved = rank, False

    def _path(self, rank: int) -> str:
        return posixpath.join(self.folder, f"rank{rank}.bin")

    def load(self) -> int:
        """Load this rank's artifacts (else rank 0's) into torch's caches; returns how many it loaded."""
        for rank in dict.fromkeys((self.rank, 0)):
            try:
                with self.fs.open_input_stream(self._path(rank)) as f:
                    blob = f.read()
            except (FileNotFoundError, OSError):
                continue
            try:
                info = torch.compiler.load_cache_artifacts(blob)
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
        blob = artifacts[0]
        self.fs.create_dir(self.folder, recursive=True)
        tmp = self._path(self.rank) + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(blob)
        self.fs.move(tmp, self._path(self.rank))  # whole or not at all: a reader never sees half a file
        return len(blob)
