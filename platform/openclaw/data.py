"""Datasets: resolving and checking Parquet sources (driver, before any worker starts), and turning a
Ray Data shard into tensors that the sampler indexes by sample position (worker).

Ray Data reads and prepares the rows; the order in which they are trained on is the platform's
(`openclaw.sampler`), so no Ray worker's timing can change it.
"""
from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from openclaw.errors import DataError


@dataclass(frozen=True)
class Source:
    """A resolved dataset: its shard files (sorted, so row positions are stable), filesystem and schema."""
    key: str
    spec: str
    files: tuple[str, ...]
    filesystem: pafs.FileSystem
    schema: pa.Schema
    num_rows: int


def resolve(spec: str, key: str) -> Source:
    """Expand a folder, glob or URI into its Parquet shards and read their metadata."""
    if "://" in spec:
        fs, root = pafs.FileSystem.from_uri(spec)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))
    files = _list_parquet(fs, root, spec, key)
    schema, rows = None, 0
    for f in files:
        try:
            meta = pq.ParquetFile(f, filesystem=fs).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"`{key}`: shard {f} is not a readable Parquet file ({e}). Re-create it, or remove it "
                            f"from {spec}.") from None
        shard_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = shard_schema
        elif not shard_schema.equals(schema):
            raise DataError(f"`{key}`: shard {f} has schema {_cols(shard_schema)}, which differs from the first "
                            f"shard's {_cols(schema)}. All shards of a dataset must share one schema.")
        rows += meta.num_rows
    if rows == 0:
        raise DataError(f"`{key}`: {spec} holds {len(files)} Parquet file(s) but no rows.")
    return Source(key, spec, tuple(files), fs, schema, rows)


def _list_parquet(fs: pafs.FileSystem, root: str, spec: str, key: str) -> list[str]:
    if any(ch in root for ch in "*?["):
        if not isinstance(fs, pafs.LocalFileSystem):
            raise DataError(f"`{key}`: globs are supported for local paths only; give the folder {spec} instead.")
        files = sorted(f for f in _glob.glob(root, recursive=True) if f.endswith(".parquet"))
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"`{key}`: dataset path {spec} does not exist. Prepare it first, e.g. "
                            f"`python data/prepare.py digits --out datasets/digits`, or fix the path.")
        if info.type == pafs.FileType.File:
            files = [root]
        else:
            sel = pafs.FileSelector(root, recursive=True)
            files = sorted(i.path for i in fs.get_file_info(sel)
                           if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DataError(f"`{key}`: no .parquet files found at {spec}.")
    return files


def _cols(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def check_columns(source: Source, features: str, label: str | None) -> None:
    """Fail before training if a configured column is missing or is not numeric."""
    for key, col in (("data.features", features), ("data.label", label)):
        if col is None:
            continue
        if col not in source.schema.names:
            raise DataError(f"`{key}`: column {col!r} is not in {source.spec} (columns: "
                            f"{', '.join(source.schema.names)}). Set `{key}` to one of them.")
        t = source.schema.field(col).type
        base = t.value_type if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) else t
        if not (pa.types.is_integer(base) or pa.types.is_floating(base)):
            raise DataError(f"`{key}`: column {col!r} in {source.spec} has type {t}; it must be numeric "
                            f"(a number or a fixed-size list of numbers).")


# ---- worker side --------------------------------------------------------------------------------


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A scalar column to `[N]`, a (fixed-size) list column to `[N, D]`, without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(arr), -1)
    return arr.to_numpy(zero_copy_only=False)


def table_from_shard(shard, columns: list[str]) -> pa.Table:
    """Collect a Ray Data shard into one Arrow table, in the dataset's own (file) order."""
    batches = list(shard.iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        raise DataError("the dataset shard delivered no rows; check that the data path is not empty.")
    return pa.concat_tables(batches).select(columns)
