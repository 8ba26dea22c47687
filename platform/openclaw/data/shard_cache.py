"""Each node's local cache of shards read from object storage (workers and Ray Data tasks; the idea of
MosaicML Streaming's cache).

A cached shard is `<key>.parquet` plus `<key>.json` (its source, size and CRC32), where the key hashes the
object's path, size and modification time, so a changed object is a miss. Every hit checks the size and
the CRC32 of the bytes it returns, so a damaged local copy is fetched again instead of trained on. A
re-read of a cached shard does not touch the network. Least-recently-used shards are evicted to keep
the folder under `max_bytes`; a shard is read whole into memory under its lock, so eviction never pulls
one from under a reader.

States of a shard: absent -> downloading (`.part` file, per-shard lock held) -> cached -> evicted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

CHUNK_BYTES = 8 * 2**20


def default_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "openclaw-shards")


@dataclass
class ShardCacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    evicted: list[str] = field(default_factory=list)


class ShardCache:
    def __init__(self, root: str | None, max_bytes: int):
        self.root, self.max_bytes = root or default_dir(), max_bytes
        os.makedirs(self.root, exist_ok=True)
        self.stats = ShardCacheStats()

    def read(self, fs: pafs.FileSystem, path: str, size: int, mtime_ns: int) -> pa.Buffer:
        """The shard's bytes, from the local copy when it is valid, else fetched once and cached."""
        key = hashlib.sha1(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()[:24]
        data, meta = os.path.join(self.root, key + ".parquet"), os.path.join(self.root, key + ".json")
        with self._lock(key):
            buf = _valid_copy(data, meta, size)
            if buf is not None:
                self.stats.hits += 1
                os.utime(meta)  # recency, for eviction
                return buf
            self.stats.misses += 1
            buf = self._fetch(fs, path, size, data, meta)
        self.evict(keep={key})
        return buf

    def _fetch(self, fs: pafs.FileSystem, path: str, size: int, data: str, meta: str) -> pa.Buffer:
        chunks, crc = [], 0
        with fs.open_input_stream(path) as src:
            while chunk := src.read(CHUNK_BYTES):
                chunks.append(chunk)
                crc = zlib.crc32(chunk, crc)
        body = b"".join(chunks)
        if len(body) != size:
            raise OSError(f"shard {path}: fetched {len(body)} bytes, expected {size}; the object changed or the "
                          f"transfer was cut short")
        tmp = data + f".{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, data)
        with open(meta + ".part", "w") as f:
            json.dump({"source": path, "size": size, "crc32": crc}, f)
        os.replace(meta + ".part", meta)
        self.stats.bytes_fetched += size
        return pa.py_buffer(body)

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
        fd = os.open(os.path.join(self.root, key + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
