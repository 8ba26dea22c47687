"""Local staging folders for checkpoint writes (worker process), and the removal of those a killed
worker left behind.

A checkpoint is written to a local folder before it is copied into the run's storage. A worker killed
mid-save (SIGKILL, OOM, a lost node's survivor of a preemption) never runs its cleanup, and the folder,
as large as the model and its optimizer state, would stay in the node's temp folder for good: on a
node that loses a few workers a day, that fills the disk. Each folder's name carries the host and
process that own it; a worker starting on the node removes the folders of this host whose process is
gone. A folder of a live process, of another host (a temp folder shared between hosts), or of another
user is never touched.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("openclaw")

PREFIX = "openclaw-ckpt-"
_NAME = re.compile(re.escape(PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def new_staging_dir() -> str:
    """A new, empty staging folder owned by this process; the caller removes it."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-")


@contextlib.contextmanager
def staging_dir() -> Iterator[str]:
    """A staging folder for the duration of a `with` block."""
    d = new_staging_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):  # a file that went, or cannot be read: its size is not counted
            total += f.stat().st_size if f.is_file() else 0
    return total


def remove_stale(tmp: str | None = None) -> list[Path]:
    """Remove this host's staging folders (in `tmp`, the temp folder by default) whose process has
    exited, and this user's only; returns the folders removed."""
    root, host, removed = Path(tmp or tempfile.gettempdir()), _host(), []
    for entry in root.glob(f"{PREFIX}*"):
        m = _NAME.match(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        try:
            if not entry.is_dir() or entry.is_symlink() or entry.stat().st_uid != os.getuid():
                continue
            # claimed first, under a name of this (live) process: the node's other workers sweep at the same
            # time, and one removing a folder while another walked it crashed the walker
            claimed = root / f"{PREFIX}{host}-{os.getpid()}-swept{secrets.token_hex(4)}"
            os.rename(entry, claimed)
        except FileNotFoundError:  # another worker of this node claimed it first
            continue
        size = _size(claimed)
        shutil.rmtree(claimed, ignore_errors=True)
        log.info("removed %s (%.1f MB), a checkpoint staging folder left by exited process %s",
                 entry, size / 1e6, m["pid"])
        removed.append(entry)
    return removed
