"""Each node's local cache of shards read from object storage (workers and Ray Data tasks; the idea of
MosaicML Streaming's cache).

A cached shard is `<key>.parquet` plus `<key>.json` (its source, size and CRC32), where the key hashes the
object's path, size, modification time and ETag, so a changed object is a miss (S3 keeps modification
times to the second: a rewrite of the same size within the same second differs by its ETag alone). A
fetch whose object has another ETag than the job listed fails: the object changed under the job. Every
hit checks the size and the CRC32 of the bytes it returns, so a damaged local copy is fetched again
instead of trained on. A re-read of a cached shard does not touch the network. Least-recently-used
shards are evicted to keep the folder under `max_bytes`; a shard is read whole into memory under its
lock, so eviction never pulls one from under a reader.

States of a shard: absent -> downloading (`.part` file, per-shard lock held) -> cached -> evicted; a
download whose local write fails (a full disk) -> absent, its bytes served uncached.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from openclaw.errors import DataError

CHUNK_BYTES = 8 * 2**20
log = logging.getLogger("openclaw")


STALE_S = 3600.0
"""A `.part` file or a lock file with no shard this old is left over from a process that died."""


def default_dir() -> str:
    """Per user: other users of the machine can neither read the shards nor plant files in the folder."""
    return os.path.join(tempfile.gettempdir(), f"openclaw-shards-{os.getuid()}")


def own_folder(root: str) -> str:
    """Create `root` (0700) or check that it is a real folder of this user's that no one else may write:
    the shards in it are trained on."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise DataError(f"`data.shard_cache.dir` ({root}) is not a folder of this user's that only this user may "
                        f"write (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); choose another, or "
                        f"chmod 700 it.")
    return root


@dataclass
class ShardCacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    evicted: list[str] = field(default_factory=list)


class ShardCache:
    def __init__(self, root: str | None, max_bytes: int):
        self.root, self.max_bytes = own_folder(root or default_dir()), max_bytes
        self.stats = ShardCacheStats()
        self.sweep()

    def sweep(self, stale_s: float = STALE_S) -> list[str]:
        """Remove what died processes left, older than `stale_s`: `.part` files, lock files of no shard, and
        shards without their `.json` (a fetch or an eviction cut between its two files), which no eviction
        would ever count or remove."""
        removed, now = [], time.time()
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            try:
                stale = now - os.lstat(path).st_mtime > stale_s
            except FileNotFoundError:
                continue
            if stale and name.endswith(".part"):
                _unlink(path)
                removed.append(name)
            elif stale and name.endswith(".lock") and not os.path.exists(path[:-5] + ".json"):
                with self._lock(name[:-5], blocking=False) as got:  # not one a fetch holds or waits on
                    if got and not os.path.exists(path[:-5] + ".json"):
                        _unlink(path)
                        removed.append(name)
            elif stale and name.endswith(".parquet") and not os.path.exists(path[:-8] + ".json"):
                with self._lock(name[:-8], blocking=False) as got:  # not while a fetch is between its files
                    if got and not os.path.exists(path[:-8] + ".json"):
                        _unlink(path)
                        removed.append(name)
        return removed

    def read(self, fs: pafs.FileSystem, path: str, size: int, mtime_ns: int, etag: str = "") -> pa.Buffer:
        """The shard's bytes, from the local copy when it is valid, else fetched once and cached. `etag`: the
        object's ETag when the job listed it (`Shard.etag`); empty, none is checked."""
        key = hashlib.sha1(f"{path}|{size}|{mtime_ns}{'|' + etag if etag else ''}".encode()).hexdigest()[:24]
        data, meta = os.path.join(self.root, key + ".parquet"), os.path.join(self.root, key + ".json")
        with self._lock(key):
            buf = _valid_copy(data, meta, size)
            if buf is not None:
                self.stats.hits += 1
                os.utime(meta)  # recency, for eviction
                return buf
            self.stats.misses += 1
            buf = self._fetch(fs, path, size, etag, data, meta)
        self.evict(keep={key})
        return buf

    def _fetch(self, fs: pafs.FileSystem, path: str, size: int, etag: str, data: str, meta: str) -> pa.Buffer:
        chunks, crc = [], 0
        with fs.open_input_stream(path) as src:
            got = (src.metadata() or {}).get("ETag", b"").decode()
            if etag and got and got != etag:
                raise OSError(f"shard {path}: the object changed since the job listed it (ETag {got}, not {etag}); "
                              f"a dataset must not change under a run")
            while chunk := src.read(CHUNK_BYTES):
                chunks.append(chunk)
                crc = zlib.crc32(chunk, crc)
        body = b"".join(chunks)
        if len(body) != size:
            raise OSError(f"shard {path}: fetched {len(body)} bytes, expected {size}; the object changed or the "
                          f"transfer was cut short")
        self._keep(path, body, json.dumps({"source": path, "size": size, "crc32": crc}).encode(), data, meta)
        self.stats.bytes_fetched += size
        return pa.py_buffer(body)

    def _keep(self, path: str, body: bytes, info: bytes, data: str, meta: str) -> None:
        """Write a fetched shard into the cache, under its lock. A local write that fails (a full disk, a
        quota) is no fault of the shard's, whose bytes are in memory, whole: they are served uncached, with
        a warning, and nothing of them is left (the run goes on; the next read fetches the shard again).
        Raising instead blamed the shard ("could not be read"), and under `on_bad_shard: skip` the
        preparation took the good shard for a bad one and recorded it so in the cached preparation, which
        every later run then trained without."""
        try:
            for dest, content in ((data, body), (meta, info)):
                tmp = dest + f".{os.getpid()}.part"
                try:
                    with _new_file(tmp) as f:
                        f.write(content)
                    os.replace(tmp, dest)
                finally:
                    _unlink(tmp)
        except OSError as e:
            _unlink(data)  # no shard without its `.json`: no eviction would count it
            log.warning("could not keep shard %s in the shard cache %s (%s); reading it uncached. Free space "
                        "there, lower `data.shard_cache.max_bytes`, or set `data.shard_cache.dir` to a larger disk.",
                        path, self.root, e)

    def evict(self, keep: set[str] = frozenset()) -> None:
        """Drop least-recently-used shards until the folder fits in `max_bytes` (never those in `keep`)."""
        entries = []
        for name in os.listdir(self.root):
            if name.endswith(".json"):
                key = name[:-5]
                try:
                    st_meta = os.stat(os.path.join(self.root, name))
                    size = os.stat(os.path.join(self.root, key + ".parquet")).st_size
                except FileNotFoundError:
                    continue
                entries.append((st_meta.st_mtime, key, size))
        total = sum(e[2] for e in entries)
        for _, key, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if key in keep:
                continue
            with self._lock(key, blocking=False) as got:
                if not got:  # being read or fetched right now
                    continue
                for ext in (".json", ".parquet"):
                    _unlink(os.path.join(self.root, key + ext))
            total -= size
            self.stats.evicted.append(key)

    @contextmanager
    def _lock(self, key: str, blocking: bool = True):
        """`key`'s lock, exclusively (`blocking=False`: yields whether it got it). The lock file a sweep
        removed (under this lock) while this process waited on it is no lock: opened again until the file
        locked is the one at the path."""
        path = os.path.join(self.root, key + ".lock")
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            if _same_file(fd, path):
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)


def _new_file(path: str):
    """A new file of this user's only: never one that exists, never through a link someone planted."""
    _unlink(path)  # a .part of this process's that an earlier attempt left
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb")


def _valid_copy(data: str, meta: str, size: int) -> pa.Buffer | None:
    try:
        with open(meta) as f:
            want = json.load(f)
        with open(data, "rb") as f:
            body = f.read()
    except (FileNotFoundError, ValueError):
        return None
    if len(body) != size or want.get("size") != size or zlib.crc32(body) != want.get("crc32"):
        return None  # damaged or stale: fetch again
    return pa.py_buffer(body)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
