"""The spool file: tracking ops a run could not deliver before it ended, kept as JSON lines (written by
the tracking actor and the driver, read by `openclaw sync-spool` on the driver). Its first line names
the run (`run`: tracking URI, run id); the others are ops, in the order they were sent."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Any, BinaryIO, Iterator

from openclaw.tracking.redact import public_uri


def append_ops(path: str, uri: str, run_id: str, ops: list[tuple[str, tuple]]) -> None:
    """`ops` ((op, args) pairs) at the end of `run_id`'s spool file, begun with its `run` line when new or
    empty (the URI without its user info: no credential at rest). A process killed between creating the
    file and writing that line left a file every later append made unreadable."""
    lines = b"".join(_line(op, *args) for op, args in ops)  # all encoded before any is written
    with _appending(path) as f:
        if f.tell() == 0:
            f.write(_line("run", public_uri(uri), run_id))
        f.write(lines)


@contextlib.contextmanager
def _appending(path: str) -> Iterator[BinaryIO]:
    """The spool file open at its end, under its lock (the tracking actor and the driver both append), its
    last line whole: a line a crash cut short is dropped (it was never written whole, and the next op
    would have continued it, making the file unreadable to `sync-spool` and blocking the run's resume)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # it may hold the run's metrics: its owner's only
    with os.fdopen(fd, "r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (NFSv3 without its lock daemon): append unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        end = f.seek(0, os.SEEK_END)
        if end and f.seek(end - 1) >= 0 and f.read(1) != b"\n":
            f.seek(0)
            whole, _, tail = f.read().rpartition(b"\n")
            keep = len(whole) + 1 if whole or _ else 0
            if _parses(tail):  # whole but for its newline
                f.write(b"\n")
            else:
                f.truncate(keep)
                f.seek(keep)
        yield f
        f.flush()
        os.fsync(f.fileno())


def _line(op: str, *args: Any) -> bytes:
    return (json.dumps({"op": op, "args": list(args)}, default=_plain) + "\n").encode()


def _plain(value: Any) -> Any:
    """A value JSON has no type for: numpy's scalars and arrays as the numbers they hold, anything else as
    its text. (An op that failed to encode halfway through a flush left a spool of its `run` line alone,
    and the ops after it were lost.)"""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def read_spool(path: str) -> tuple[tuple[str, str], list[dict[str, Any]]]:
    """((tracking URI, run id), ops) of a spool file; a last line a crash cut short is left out."""
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    if lines and not _parses(lines[-1]):
        lines.pop()
    ops = [json.loads(line) for line in lines]
    if not ops:
        return ("", ""), []
    if not all(isinstance(op, dict) and "op" in op and isinstance(op.get("args"), list) for op in ops) \
            or ops[0]["op"] != "run":
        raise ValueError(f"{path} is not an openclaw spool file (JSON lines of ops, the first a 'run' line)")
    uri, run_id = ops[0]["args"][:2]
    return (uri, run_id), ops[1:]


def holds_ops(path: str) -> bool:
    """Whether a spool file holds an op to upload, not its `run` line alone (what a kill mid-append leaves,
    and `sync-spool` has nothing to upload from). One that cannot be read counts: it needs a look."""
    try:
        return bool(read_spool(path)[1])
    except (OSError, ValueError):
        return True
