"""Sharded checkpoints with torch.distributed.checkpoint (DCP) (plain torch; workers, and any process
that loads a model): every rank writes its own shards of the model and the optimizer, keyed by
parameter name, and loading reads back whatever shards a rank needs at its own layout, so a run
saved at one world size (or strategy) loads at another.

Nothing read from a checkpoint runs code. DCP unpickles its `.metadata` file and `torch.load`s its
non-tensor values with `weights_only=False`; here the metadata is unpickled with an allow-list of
DCP's own metadata classes, and the values with `weights_only=True`. The allow-list names torch
classes, so a torch upgrade that moves them makes loading fail loudly, never run what it finds.
"""
from __future__ import annotations

import os
import pickle
import warnings
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper for flattened keys

from openclaw.errors import CheckpointError

SHARDS_DIR = "model"
"""The DCP folder inside a sharded checkpoint."""

_META = "torch.distributed.checkpoint.metadata."
ALLOWED_GLOBALS = {_META + n for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")} | {
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.Size", "torch.serialization._get_layout",
    "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "collections.OrderedDict"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if f"{module}.{name}" in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata unpickled through the allow-list."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"checkpoint shards in {self.path}: {e}; refusing to load them.") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_filesystem.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values (the optimizer's hyperparameters) loaded weights_only."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save_shards(state: dict[str, Any], directory: str | os.PathLike, group=None) -> None:
    """Collective: every rank writes its shards of `state` into its own `directory` (rank 0 also the
    metadata). The folders' files together are the checkpoint's shards."""
    dcp.save(state, storage_writer=FileSystemWriter(str(directory)), process_group=group)


def async_save_shards(state: dict[str, Any], directory: str | os.PathLike, group) -> Future:
    """`save_shards` in the background: `state` is copied to host memory before this returns; the write
    (and its collectives, on `group`, which must not be the training's) finish with the future."""
    return dcp.async_save(state, storage_writer=FileSystemWriter(str(directory)), process_group=group)


def load_shards(state: dict[str, Any], directory: str | os.PathLike) -> None:
    """Fill `state` (this rank's layout, e.g. a strategy's `state_dict`) in place from a checkpoint's
    shards. Collective when a process group exists; alone in a single process without one."""
    no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeReader(str(directory)), planner=WeightsOnlyPlanner(), no_dist=no_dist)
    except dcp.api.CheckpointException as e:  # a BaseException: say what it means, as ours
        raise CheckpointError(f"checkpoint shards in {directory} could not be loaded: {dcp_causes(e)}") from None


def dcp_causes(error: BaseException) -> str:
    """What a DCP failure says went wrong on each rank (its own message leads with the tracebacks, so its
    first 500 characters were only a header): `rank 1: RuntimeError: Missing key ...`."""
    failures = getattr(error, "failures", None) or {}
    said = []
    for rank, pair in sorted(failures.items()):
        cause = pair[0] if isinstance(pair, tuple) else pair
        said.append(f"rank {rank}: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
    return "; ".join(said) or " ".join(str(error).split())[-500:]
