"""Driver side: prepare each dataset before training, as Ray Data tasks, through the prepared-data cache.

Preparation runs when `data.transforms` is set (their output is cached) or under `data.on_bad_shard:
skip` (every shard is read through once, and the bad ones are left out, before sample ids are fixed).
One Ray Data task per shard reads it (from the node's shard cache when it is remote) a row group at a
time, runs the transforms and writes `part-<shard>.parquet`: output files keep the source's order, so
sample ids are stable, and a bad shard is known by name. Training then streams the cached shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from openclaw.constants import apply_secret_env, secret_env
from openclaw.data.config import DataConfig
from openclaw.data.sources import (READ_ATTEMPTS, RETRY_PAUSE_S, Shard, Source, check_columns, footer_nulls,
                                   footer_ranges)
from openclaw.errors import DataError
from openclaw.data.filesystems import filesystem_for, is_remote
from openclaw.data.prep_cache import Entry, PrepCache
from openclaw.data.shard_cache import ShardCache
from openclaw.data.transforms import apply_to_table, code_version

log = logging.getLogger("openclaw")


@dataclass
class Prepared:
    """A dataset as training reads it, and what its preparation did (for lineage)."""
    source: Source
    raw: Source
    cache: str = "off"
    """`hit`, `miss`, or `off` (nothing to prepare)."""
    cache_key: str | None = None
    prepare_s: float = 0.0
    evicted: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    """The prepared-data cache's folder (absolute) where this run found or put it."""


def needs_preparation(d: DataConfig) -> bool:
    return bool(d.transforms) or d.on_bad_shard == "skip"


def fingerprint(source: Source, d: DataConfig) -> str:
    """The cache key: the source's files, the transforms and their code, and the bad-shard policy."""
    payload = {"files": [[s.path, s.size, s.mtime_ns] + ([s.etag] if s.etag else []) for s in source.shards],
               "skipped": [p for p, _ in source.skipped],
               "transforms": [t.model_dump() for t in d.transforms], "code": code_version(d.transforms),
               "on_bad_shard": d.on_bad_shard, "endpoint": d.s3.endpoint_url}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(d: DataConfig, storage: str) -> str:
    if d.cache.dir:
        return d.cache.dir
    if "://" in storage:
        raise DataError("`data.transforms` (or `data.on_bad_shard: skip`) needs a local or shared folder for the "
                        "prepared data; set `data.cache.dir`.")
    return os.path.join(storage, ".data-cache")


def check_transforms(source: Source, d: DataConfig) -> pa.Schema:
    """Run the transforms on a few rows of the first shard that has some, before anything starts: a
    transform that fails, or an output without the training columns, is reported now. Returns the output
    schema. A shard that cannot be read is named (under `data.on_bad_shard: skip`, the next one is tried:
    the preparation leaves it out)."""
    first, head = _first_rows(source, d.on_bad_shard)
    try:
        out = apply_to_table(head, d.transforms)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"`data.transforms` failed on the first rows of {first.path}: {type(e).__name__}: {e}") from None
    return out.schema


def _first_rows(source: Source, on_bad_shard: str, rows: int = 64) -> tuple[Shard, pa.Table]:
    for shard in source.shards:
        try:
            reader = pq.ParquetFile(shard.path, filesystem=source.filesystem)
            if reader.num_row_groups and reader.metadata.num_rows:
                return shard, reader.read_row_group(0).slice(0, rows)
        except (pa.ArrowException, OSError) as e:
            if on_bad_shard != "skip":
                raise DataError(f"`{source.key}`: shard {shard.path} could not be read ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}). Re-create it, or set `data.on_bad_shard: skip` "
                                f"to train without it.") from None
    raise DataError(f"`{source.key}`: no shard of {source.spec} has rows the transforms could be tried on.")


def prepare(sources: dict[str, Source], d: DataConfig, storage: str) -> tuple[dict[str, Prepared], PrepCache | None]:
    """Each source as training reads it: prepared (or found in the cache) when `needs_preparation`."""
    if not needs_preparation(d):
        return {k: Prepared(s, s) for k, s in sources.items()}, None
    cache = PrepCache(cache_dir(d, storage), d.cache.max_bytes)
    out = {}
    for name, src in sources.items():
        key = fingerprint(src, d)
        entry, prepared = _acquire(cache, key, src, d)
        check_columns(prepared, d.features, d.label)
        out[name] = Prepared(prepared, src, "hit" if entry.hit else "miss", key, entry.manifest["prepare_s"],
                             entry.evicted, cache.root)
    return out, cache


def _acquire(cache: PrepCache, key: str, src: Source, d: DataConfig) -> tuple[Entry, Source]:
    """The key's entry, held, and the source it holds. An entry whose part file cannot be read (deleted, or
    cut short, after it was published) is prepared again in its place, once: every later run hit it and
    failed with Arrow's bare error. If the new one cannot be read either, the entry is named."""
    def make(tmp: str) -> dict[str, Any]:
        return _prepare_source(src, d, tmp)
    entry = cache.acquire(key, make)
    for again in (False, True):
        try:
            return entry, _prepared_source(src, entry.path, entry.manifest, transformed=bool(d.transforms))
        except (pa.ArrowException, OSError) as e:
            cache.release(key)
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            # Only damage (a part cut short, or gone) prepares it again, in its place: a transient error (too
            # many open files, a network filesystem's hiccup) would pull a good entry from a run reading it.
            if not isinstance(e, (pa.ArrowInvalid, FileNotFoundError)):
                raise DataError(f"the prepared-data cache entry {entry.path} could not be read ({why}); run "
                                f"again.") from None
            if again:
                raise DataError(f"the prepared-data cache entry {entry.path} cannot be read even prepared again "
                                f"({why}); delete it, or set `data.cache.dir` to another folder.") from None
            log.warning("the prepared-data cache entry %s cannot be read (%s); preparing it again", entry.path, why)
            entry = cache.acquire(key, make, unreadable=entry.manifest)


def _prepared_source(raw: Source, folder: str, manifest: dict[str, Any], transformed: bool) -> Source:
    skipped = tuple((p, why) for p, why in manifest["skipped"])
    if transformed:
        paths = [(os.path.join(folder, _shard_name(s["file"], folder)), s) for s in manifest["shards"] if s["rows"]]
        metas = [(path, s, pq.read_metadata(path)) for path, s in paths]
        shards = tuple(Shard(path, s["rows"], s["bytes"], 0, ranges=footer_ranges(meta), nulls=footer_nulls(meta))
                       for path, s, meta in metas)
    else:  # verified only: train on the good source shards themselves
        good = {s["source"] for s in manifest["shards"]}
        shards = tuple(s for s in raw.shards if s.path in good)
    if not sum(s.rows for s in shards):
        raise DataError(f"`{raw.key}`: no rows left after {'preparing' if transformed else 'checking'} {raw.spec}"
                        + (f" ({len(skipped)} bad shard(s) skipped; the first: {skipped[0][1]})." if skipped else "."))
    if not transformed:
        return raw.with_shards(shards, skipped)
    return Source(raw.key, folder, shards, filesystem_for(folder)[0], pq.read_schema(shards[0].path),
                  raw.skipped + skipped)


def _shard_name(name: str, folder: str) -> str:
    """A shard file named by a cache entry's manifest: a plain name inside the entry's folder."""
    if not name or os.path.isabs(name) or "/" in name or "\\" in name or name in (".", ".."):
        raise DataError(f"the prepared-data cache entry {folder} names the shard {name!r}, which is not a file in it; "
                        f"delete the entry (it is prepared again).")
    return name


def _prepare_source(src: Source, d: DataConfig, tmp: str) -> dict[str, Any]:
    import ray.data
    t0 = time.perf_counter()
    items = [{"i": i, "path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "etag": s.etag}
             for i, s in enumerate(src.shards)]
    task = _ShardTask(src.spec, d.s3.model_dump(), d.transforms, tmp, d.shard_cache.dir, d.shard_cache.max_bytes,
                      secret_env())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    results = sorted(ray.data.from_items(items, override_num_blocks=len(items)).map(task).take_all(),
                     key=lambda r: r["i"])
    shards, skipped = [], []
    for r in results:
        if r.get("fatal"):
            raise DataError(r["fatal"])
        if r["error"] is None:
            shards.append({"source": r["path"], "file": r["file"], "rows": r["rows"], "bytes": r["bytes"]})
        elif d.on_bad_shard == "skip":
            skipped.append([r["path"], r["error"]])
        else:
            raise DataError(f"`{src.key}`: {r['error']}. Re-create the shard, or set `data.on_bad_shard: skip` to "
                            f"train without it.")
    return {"source": src.uri, "shards": shards, "skipped": skipped, "rows": sum(s["rows"] for s in shards),
            "transforms": [t.model_dump() for t in d.transforms], "prepare_s": time.perf_counter() - t0}


class _ShardTask:
    """One shard: read it a row group at a time, transform, write (or, with no transforms, only read)."""

    def __init__(self, spec: str, s3: dict, transforms: list, out_dir: str, shard_cache_dir: str | None,
                 shard_cache_bytes: int, secrets: dict[str, str]):
        """`secrets`: the driver's credentials, carried in the task (in memory), not in a runtime env."""
        self.spec, self.s3, self.transforms, self.out_dir, self.secrets = spec, s3, transforms, out_dir, secrets
        self.shard_cache = (shard_cache_dir, shard_cache_bytes) if is_remote(spec) else None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """The shard's outcome. An object store's read that fails is tried again (`READ_ATTEMPTS`, with a
        growing pause) before the shard counts as bad: under `skip`, a reset connection would otherwise leave
        a good shard out of every run that finds this preparation in the cache."""
        apply_secret_env(self.secrets)
        fs, _ = filesystem_for(self.spec, self.s3)
        for attempt in range(READ_ATTEMPTS if self.shard_cache else 1):
            if attempt:
                time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))
            out = self._once(fs, item)
            if out["error"] is None:
                break
        return out

    def _once(self, fs, item: dict[str, Any]) -> dict[str, Any]:
        out = {"i": item["i"], "path": item["path"], "file": None, "rows": 0, "bytes": 0, "error": None,
               "fatal": None}
        try:
            if self.shard_cache:
                body = ShardCache(*self.shard_cache).read(fs, item["path"], item["size"], item["mtime_ns"],
                                                          item["etag"])
                reader = pq.ParquetFile(pa.BufferReader(body))
            else:
                reader = pq.ParquetFile(item["path"], filesystem=fs)
            tables = (reader.read_row_group(g) for g in range(reader.num_row_groups))
            if not self.transforms:
                out["rows"] = sum(t.num_rows for t in tables)
                return out
            out["file"] = f"part-{item['i']:05d}.parquet"
            path = os.path.join(self.out_dir, out["file"])
            writer = None
            for table in tables:
                table = _transform(table, self.transforms, item["path"])
                with _writing(path):
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema)
                    writer.write_table(table)
                out["rows"] += table.num_rows
            if writer is not None:
                with _writing(path):
                    writer.close()
                    _fsync(path)
                out["bytes"] = os.path.getsize(path)
        except (pa.ArrowException, OSError) as e:
            out["error"] = f"shard {item['path']} could not be read ({type(e).__name__}: {' '.join(str(e).split())})"
        except DataError as e:  # a transform that does not fit the data: no policy skips that
            out["fatal"] = str(e)
        except Exception as e:  # outputs whose schema differs between row groups (the writer's ValueError)
            out["fatal"] = _transform_failed(item["path"], e)
        if (out["error"] or out["fatal"]) and out["file"]:  # no half-written part is left
            _unlink(os.path.join(self.out_dir, out["file"]))
        return out


@contextlib.contextmanager
def _writing(path: str):
    """A prepared part's write that fails (a full disk, a quota) stops the preparation naming the part: it is
    no fault of the shard's, which as a read error `on_bad_shard: skip` left out of every later run that
    found this preparation in the cache."""
    try:
        yield
    except OSError as e:
        raise DataError(f"could not write the prepared shard {path} ({' '.join(str(e).split())}); free space "
                        f"there, or set `data.cache.dir` to a folder on a larger disk") from None


def _fsync(path: str) -> None:
    """On disk before the entry is published: a crash then must not leave a published entry whose part
    the disk never got."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _transform(table: pa.Table, transforms: list, path: str) -> pa.Table:
    """The transforms' output for one row group. Any error in them names the shard: a transform's Arrow
    error (a failed cast) is the transform's, not a sign of a bad shard that `skip` would leave out."""
    try:
        return apply_to_table(table, transforms)
    except DataError as e:
        raise DataError(f"{e} (shard {path})") from None
    except Exception as e:
        raise DataError(_transform_failed(path, e)) from None


def _transform_failed(path: str, error: Exception) -> str:
    return (f"`data.transforms` failed on shard {path} ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:500]}); fix the transform or the data")
