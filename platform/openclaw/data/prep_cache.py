"""The prepared-data cache (driver): the transforms' output, kept as Parquet shards under `data.cache.dir`.

An entry is a folder named by its key, a fingerprint of the source files (paths, sizes, modification
times), the transform config and the transform code. Its lifecycle:

    absent --(a run takes the key's lock exclusively)--> preparing in `.tmp/<key>-<uuid>/`
           --(manifest written last, folder renamed into place: atomic)--> published
           --(a run finds a part file unreadable: deleted or cut short)--> prepared again in its place
           --(no run holds the key's lock; least recently used; cache over `max_bytes`)--> evicted

A run holds a shared lock on its entry's key for as long as it trains on it, so eviction (which needs
the lock exclusively) never removes an entry in use, and a second run preparing the same key waits for
the first and then reads its entry: one valid entry, and nobody reads a half-written one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

MANIFEST = "manifest.json"


@dataclass
class Entry:
    key: str
    path: str
    manifest: dict[str, Any]
    hit: bool
    """False when this run prepared it."""
    evicted: list[str] = field(default_factory=list)


PREPARING = ".preparing.lock"
"""The lock file (beside a key's own) that one preparer of the key holds while it prepares."""


class PrepCache:
    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = os.path.abspath(os.path.expanduser(root)), max_bytes
        for sub in ("entries", ".tmp", ".locks"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._held: dict[str, int] = {}
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove what died preparers and evictions left in `.tmp` (`<key>-<id>`, `evict-<key>-<id>`,
        `<key>-unreadable-<id>`), where no preparer holds the key's lock.

        Lock files stay, empty: a lock file removed while another process waits on it (or has just opened
        it) splits the lock in two, and two sweepers removing the same file crashed each other's start."""
        removed = []
        for name in os.listdir(os.path.join(self.root, ".tmp")):
            key = name.removeprefix("evict-").rsplit("-", 1)[0].removesuffix("-unreadable")
            if self._if_free(key, lambda: shutil.rmtree(os.path.join(self.root, ".tmp", name), ignore_errors=True)):
                removed.append(f".tmp/{name}")
        return removed

    def _if_free(self, key: str, action) -> bool:
        """Run `action` while holding `key`'s lock exclusively, if no one holds it; whether it ran."""
        if key in self._held:
            return False
        fd = os.open(os.path.join(self.root, ".locks", key + ".lock"), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            action()
            return True
        finally:
            os.close(fd)

    def entry_path(self, key: str) -> str:
        return os.path.join(self.root, "entries", key)

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The published entry's manifest, or None."""
        try:
            with open(os.path.join(self.entry_path(key), MANIFEST)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self, key: str, prepare: Callable[[str], dict[str, Any]],
                unreadable: dict[str, Any] | None = None) -> Entry:
        """The entry for `key`, prepared with `prepare(tmp_folder) -> manifest` on a miss, and held in use
        (shared lock) until `release(key)`. Then evicts other unused entries to fit `max_bytes`.
        `unreadable`: the manifest of the entry the caller could not read: a miss too, unless another run
        has prepared the entry again meanwhile (its manifest is another)."""
        fd = os.open(os.path.join(self.root, ".locks", key + ".lock"), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while in use: no eviction, no sweep of its preparation
            manifest, hit = self.lookup(key), True
            if _is_miss(manifest, unreadable):
                # One preparer per key, under a lock of its own: the others wait there, then find it published.
                # Not by turning the shared lock exclusive: two runs that both missed each held it shared, and
                # the second waited for the first's whole run, which went on holding it shared.
                with self._preparing(key):
                    manifest = self.lookup(key)
                    if _is_miss(manifest, unreadable):
                        manifest, hit = self._prepare(key, prepare), False
        except BaseException:
            os.close(fd)
            raise
        self._held[key] = fd
        os.utime(os.path.join(self.entry_path(key), MANIFEST))  # recency, for eviction
        return Entry(key, self.entry_path(key), manifest, hit, self.evict(keep=key))

    @contextlib.contextmanager
    def _preparing(self, key: str):
        fd = os.open(os.path.join(self.root, ".locks", key + PREPARING), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def release(self, key: str) -> None:
        fd = self._held.pop(key, None)
        if fd is not None:
            os.close(fd)

    def _prepare(self, key: str, prepare: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        tmp = os.path.join(self.root, ".tmp", f"{key}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            t0 = time.perf_counter()
            manifest = dict(prepare(tmp), key=key, created=time.time())
            manifest.setdefault("prepare_s", time.perf_counter() - t0)
            manifest["bytes"] = _folder_bytes(tmp)
            with open(os.path.join(tmp, MANIFEST), "w") as f:  # last: a folder without it is not an entry
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            self._clear_unreadable(key)
            os.rename(tmp, self.entry_path(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _clear_unreadable(self, key: str) -> None:
        """Under `key`'s preparing lock, with its manifest unreadable (a crash mid-write, a truncated file) or
        a part file (`acquire`'s `unreadable`): what is left of the entry, out of the way of the new one (the
        rename onto it failed, run after run)."""
        old = self.entry_path(key)
        if os.path.lexists(old):
            aside = os.path.join(self.root, ".tmp", f"{key}-unreadable-{uuid.uuid4().hex[:8]}")
            os.rename(old, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries no run holds until the cache fits `max_bytes`."""
        entries = []
        for key in os.listdir(os.path.join(self.root, "entries")):
            manifest = os.path.join(self.entry_path(key), MANIFEST)
            try:
                entries.append((os.stat(manifest).st_mtime, key, _folder_bytes(self.entry_path(key))))
            except FileNotFoundError:
                continue
        total, evicted = sum(e[2] for e in entries), []
        for _, key, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if key == keep or key in self._held:
                continue
            fd = os.open(os.path.join(self.root, ".locks", key + ".lock"), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a run is training on it
                os.close(fd)
                continue
            try:
                doomed = os.path.join(self.root, ".tmp", f"evict-{key}-{uuid.uuid4().hex[:8]}")
                os.rename(self.entry_path(key), doomed)  # gone from view at once, then deleted
                shutil.rmtree(doomed, ignore_errors=True)
                evicted.append(key)
            except FileNotFoundError:  # another run evicted it between our listing and our lock: room made
                pass
            finally:
                os.close(fd)
            total -= size
        return evicted


def _is_miss(manifest: dict[str, Any] | None, unreadable: dict[str, Any] | None) -> bool:
    """No entry, or still the one a caller could not read (the same `created`: not prepared again since)."""
    return manifest is None or (unreadable is not None and manifest.get("created") == unreadable.get("created"))


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
