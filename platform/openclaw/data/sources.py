"""Datasets: resolving a Parquet source into its shards and checking its columns (driver, before any
worker starts), and turning Arrow columns into numpy arrays (driver, workers and Ray Data tasks).

Ray Data prepares the rows (`data.prep`); the workers stream the shards themselves (`data.stream`) in
the platform's order (`data.sampler`), so no Ray worker's timing can change it.
"""
from __future__ import annotations

import glob as _glob
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from openclaw.errors import DataError
from openclaw.data.filesystems import filesystem_for
from openclaw.data.schemas import columns, difference, reference


FOOTER_READERS = 16
"""Shard footers read at once when resolving a dataset (each is a request on an object store)."""


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a dataset: what the readers and the cache fingerprints need."""
    path: str
    rows: int
    size: int
    mtime_ns: int
    etag: str = ""
    """The object's ETag on an object store (empty for local files). S3 keeps modification times to the
    second: a rewrite of the same size within the same second is told apart by its ETag alone."""
    ranges: tuple[tuple[str, float, float], ...] = ()
    """Each integer or float column's (name, least value, greatest value), a list column's over its
    elements, from the footer's statistics: a column some row group has none for is left out."""
    nulls: tuple[str, ...] = ()
    """The columns whose footer statistics count a null (a list column's: a null or empty list, or a
    null element); a shard written without statistics has none here."""


@dataclass(frozen=True)
class Source:
    """A resolved dataset: its good shards (sorted, so sample ids are stable), filesystem and schema, and
    the shards left out under `data.on_bad_shard: skip` with the reason for each."""
    key: str
    spec: str
    shards: tuple[Shard, ...]
    filesystem: pafs.FileSystem
    schema: pa.Schema
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.shards)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def uri(self) -> str:
        """Where the data lives, for lineage: the spec as the user wrote it, made absolute when local."""
        return self.spec if "://" in self.spec else os.path.abspath(os.path.expanduser(self.spec))

    def value_range(self, column: str) -> tuple[float, float] | None:
        """The least and greatest value of an integer or float column over every shard with rows, from
        their footers' statistics (no data read; a float column's NaNs are in none); None where a shard has
        none for it."""
        spans = [next(((lo, hi) for name, lo, hi in s.ranges if name == column), None) for s in self.shards if s.rows]
        if not spans or None in spans:
            return None
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    def with_shards(self, shards: tuple[Shard, ...], skipped: tuple[tuple[str, str], ...]) -> "Source":
        return Source(self.key, self.spec, shards, self.filesystem, self.schema, self.skipped + skipped)


def resolve(spec: str, key: str, s3=None, on_bad_shard: str = "fail") -> Source:
    """Expand a folder, glob or URI into its Parquet shards and read their footers.

    A shard whose footer is unreadable, or whose columns (names and types) differ from those most shards
    share (`data.schemas`), stops the run with its name (`on_bad_shard: fail`) or is left out (`skip`)."""
    fs, root = filesystem_for(spec, s3)
    infos = _list_parquet(fs, root, spec, key)
    with ThreadPoolExecutor(FOOTER_READERS) as pool:  # one request each: in parallel for object stores
        footers = list(pool.map(lambda i: _footer(fs, i.path), infos))
    schemas = [None if isinstance(meta, Exception) else meta.schema.to_arrow_schema() for meta, _ in footers]
    (ref, share), shards, skipped = reference(schemas), [], []
    for info, (meta, etag), shard_schema in zip(infos, footers, schemas):
        if shard_schema is None:
            problem = f"shard {info.path} is not a readable Parquet file ({meta})"
            todo = f"Re-create it, remove it from {spec}, or set"
        elif columns(shard_schema) != columns(schemas[ref]):
            problem = (f"shard {info.path}: {difference(schemas[ref], shard_schema)} (compared with "
                       f"{infos[ref].path}, whose schema {share})")
            todo = "All shards of a dataset must share one schema; fix the shard, or set"
        else:
            shards.append(Shard(info.path, meta.num_rows, info.size, info.mtime_ns or 0, etag, footer_ranges(meta),
                                footer_nulls(meta)))
            continue
        if on_bad_shard != "skip":
            raise DataError(f"`{key}`: {problem}. {todo} `data.on_bad_shard: skip` to train without it.")
        skipped.append((info.path, problem))
    if not shards:
        raise DataError(f"`{key}`: {spec} holds {len(infos)} Parquet file(s) and none is readable"
                        + (f" ({skipped[0][1]})." if skipped else "."))
    source = Source(key, spec, tuple(shards), fs, schemas[ref], tuple(skipped))
    if source.num_rows == 0:
        raise DataError(f"`{key}`: {spec} holds {len(infos)} Parquet file(s) but no rows.")
    return source


NUMERIC = ("INT32", "INT64", "FLOAT", "DOUBLE")
"""The Parquet physical types whose footer statistics give a column's range."""


def footer_ranges(meta: pq.FileMetaData) -> tuple[tuple[str, float, float], ...]:
    """`Shard.ranges` from a Parquet footer: each top-level column with one integer or float leaf whose
    every row group's statistics hold a min and max."""
    spans: dict[str, tuple[float, float] | None] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            name, st = col.path_in_schema.split(".")[0], col.statistics
            if st is None or not st.has_min_max or col.physical_type not in NUMERIC or \
                    (g == 0 and name in spans) or spans.get(name, (0, 0)) is None:
                spans[name] = None  # no statistics, not a number, or a second leaf (a struct)
                continue
            lo, hi = spans.get(name) or (st.min, st.max)
            spans[name] = (min(lo, st.min), max(hi, st.max))
    return tuple((name, *span) for name, span in spans.items() if span is not None)


def footer_nulls(meta: pq.FileMetaData) -> tuple[str, ...]:
    """`Shard.nulls` from a Parquet footer: the top-level columns some row group's statistics count a null in."""
    names = dict.fromkeys(
        group.column(c).path_in_schema.split(".")[0]
        for group in (meta.row_group(g) for g in range(meta.num_row_groups)) for c in range(group.num_columns)
        if (st := group.column(c).statistics) is not None and st.has_null_count and st.null_count > 0)
    return tuple(names)


READ_ATTEMPTS, RETRY_PAUSE_S = 3, 0.5
"""How often a shard on an object store is read before it counts as bad, and the first pause between
(doubling after each): a reset connection is not a bad shard."""


def _footer(fs: pafs.FileSystem, path: str) -> tuple[pq.FileMetaData | Exception, str]:
    """The shard's Parquet footer (or why it cannot be read) and its ETag, from the same request; on an
    object store, tried again (`READ_ATTEMPTS`) before it counts as unreadable."""
    error: Exception | None = None
    for attempt in range(1 if fs.type_name == "local" else READ_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))
        try:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata, _etag_of(f)
        except (pa.ArrowInvalid, OSError) as e:
            error = e
    return error, ""


def _etag_of(f: pa.NativeFile) -> str:
    """The ETag an object store sent with an opened object ("" for local files)."""
    return (f.metadata() or {}).get("ETag", b"").decode()


def _prepare_hint(spec: str) -> str:
    """How to make the dataset a missing path names: `data/prepare.py` writes `<out>/train` and `<out>/val`,
    so a path ending in either is prepared by pointing `--out` at its folder."""
    head, _, tail = spec.rstrip("/").rpartition("/")
    out = head if tail in ("train", "val") and head else "FOLDER"
    return (f"Prepare it first: `python data/prepare.py RECIPE --out {out}` writes {out}/train and {out}/val "
            f"(`python data/prepare.py --help` lists the recipes)")


def _list_parquet(fs: pafs.FileSystem, root: str, spec: str, key: str) -> list[pafs.FileInfo]:
    if any(ch in root for ch in "*?["):
        if not isinstance(fs, pafs.LocalFileSystem):
            raise DataError(f"`{key}`: globs are supported for local paths only; give the folder {spec} instead.")
        infos = fs.get_file_info(sorted(f for f in _glob.glob(root, recursive=True) if f.endswith(".parquet")))
    else:
        try:
            info = fs.get_file_info(root)
        except OSError as e:
            raise DataError(f"`{key}`: cannot reach {spec} ({e}). Check the endpoint (`data.s3.endpoint_url` or "
                            f"AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID, ...).") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"`{key}`: dataset path {spec} does not exist. {_prepare_hint(spec)}, or fix the path.")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            sel = pafs.FileSelector(root, recursive=True)
            infos = sorted((i for i in fs.get_file_info(sel)
                            if i.type == pafs.FileType.File and i.path.endswith(".parquet")), key=lambda i: i.path)
    if not infos:
        raise DataError(f"`{key}`: no .parquet files found at {spec}.")
    return infos


def check_columns(source: Source, features: str, label: str | None, nulls: bool = True) -> None:
    """Fail before training if a configured column is missing, is not numeric, or (`nulls`: the shards
    are the ones training reads) a shard's footer counts a null in it."""
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
        holed = next((s.path for s in source.shards if col in s.nulls), None) if nulls else None
        if holed is not None:
            what = "a null or empty list, or a null element" if base is not t else "null values"
            raise DataError(f"`{key}`: column {col!r} in shard {holed} holds {what}; training reads every row as "
                            f"numbers. Fill or drop those rows (when writing the data, or with a `data.transforms` "
                            f"step).")


# ---- worker side --------------------------------------------------------------------------------


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A scalar column to `[N]`, a (fixed-size) list column to `[N, D]`, without a Python loop. Unsigned
    integers wider than a byte become signed ones that hold them (torch indexes no uint16-64 tensor). A
    ValueError for a null, or lists of different lengths (which a reshape would cut into other rows)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null row(s); fill or drop them")
    width = None
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.diff(arr.offsets.to_numpy())
        if len(lengths) and lengths.min() != lengths.max():
            raise ValueError(f"its rows hold lists of {lengths.min()} to {lengths.max()} values, and every row must "
                             f"hold as many (pad them, or write a fixed-size list)")
        width = int(lengths[0]) if len(lengths) else 0
    values = arr if width is None else arr.flatten()
    if values.null_count:
        raise ValueError(f"{values.null_count} null value(s) in its lists; fill or drop those rows")
    out = values.to_numpy(zero_copy_only=False)
    return _signed(out if width is None else out.reshape(len(arr), width))


def _signed(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "u" or arr.dtype.itemsize == 1:
        return arr
    if arr.dtype.itemsize == 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"uint64 value {arr.max()} is past the int64 range torch reads")
    return arr.astype(np.int32 if arr.dtype.itemsize == 2 else np.int64)
