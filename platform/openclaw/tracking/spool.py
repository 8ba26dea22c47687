"""The spool file: tracking ops a run could not deliver before it ended, kept as JSON lines (written by
the tracking actor and the driver, read by `openclaw sync-spool` on the driver). Its first line names
the run (`run`: tracking URI, run id); the others are ops, in the order they were sent."""
from __future__ import annotations

import json
import os
from typing import Any

from openclaw.tracking.redact import public_uri


def append_ops(path: str, uri: str, run_id: str, ops: list[tuple[str, tuple]]) -> None:
    """`ops` ((op, args) pairs) at the end of `run_id`'s spool file, begun with its `run` line when new
    (the URI without its user info: no credential at rest)."""
    if not os.path.exists(path):
        append_to_spool(path, "run", public_uri(uri), run_id)
    for op, args in ops:
        append_to_spool(path, op, *args)


def append_to_spool(path: str, op: str, *args: Any) -> None:
    """One op, as a JSON line, at the end of a spool file (`sync_spool` applies them in order)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # it may hold the run's metrics: its owner's only
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps({"op": op, "args": list(args)}) + "\n")


def read_spool(path: str) -> tuple[tuple[str, str], list[dict[str, Any]]]:
    """((tracking URI, run id), ops) of a spool file."""
    with open(path) as f:
        ops = [json.loads(line) for line in f if line.strip()]
    if not ops:
        return ("", ""), []
    if not all(isinstance(op, dict) and "op" in op and isinstance(op.get("args"), list) for op in ops) \
            or ops[0]["op"] != "run":
        raise ValueError(f"{path} is not an openclaw spool file (JSON lines of ops, the first a 'run' line)")
    uri, run_id = ops[0]["args"][:2]
    return (uri, run_id), ops[1:]
