"""Where a run's tracking goes when the job ends (driver process): the tracking service's flush, and the
spool file that keeps what MLflow did not take (`openclaw sync-spool` uploads it)."""
from __future__ import annotations

import logging
import os
import sys

import ray

from openclaw import constants
from openclaw.launch.stops import allow_clean_up
from openclaw.tracking.redact import public_uri, scrub
from openclaw.tracking.service import in_flight_s
from openclaw.tracking.spool import append_ops, holds_ops

log = logging.getLogger("openclaw")


def spool_path(run_dir: str, run_id: str) -> str:
    """Where undelivered tracking ops are kept: the run's folder when it is local, else `$OPENCLAW_HOME/spool`
    (never the working folder, which `ray job submit --working-dir .` would ship)."""
    folder = run_dir if "://" not in run_dir else os.path.join(constants.openclaw_home(), "spool")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, f"tracking-spool-{run_id}.jsonl")


def flush_tracking(tracking, uri: str, timeout_s: float) -> str | None:
    """Wait for the tracking service to deliver everything. If the server stays away, say where it is
    kept and return that spool file's path."""
    allow_clean_up(timeout_s + in_flight_s())  # a stop at once under way waits for the flush (it spools at its end)
    try:
        outcome = ray.get(tracking.flush.remote(timeout_s))
    except Exception as e:  # the service is gone with its queue: nothing more can be done here
        log.warning("the tracking service failed: %s", e)
        return None
    if outcome.get("refused"):
        print(f"openclaw: MLflow at {public_uri(uri)} refused {outcome['refused']} tracking update(s); they are kept in "
              f"{outcome['dead_letter']} (after fixing the cause, `openclaw sync-spool {outcome['dead_letter']}` "
              f"sends them again). Every other update was delivered.", file=sys.stderr, flush=True)
    if outcome["delivered"]:
        return None
    print(f"openclaw: MLflow at {public_uri(uri)} did not answer; {outcome['ops']} tracking update(s) are kept in "
          f"{outcome['spool']}. Upload them when it is back: openclaw sync-spool {outcome['spool']}",
          file=sys.stderr, flush=True)
    return outcome["spool"]


def ending_not_taken(run_dir: str, uri: str, run_id: str, status: str, error: Exception) -> None:
    """A failed or stopped run's ending (`status`) the server did not take: into the run's spool where one
    waits for `sync-spool` anyway (its upload then closes the run), else said: the run stays RUNNING in
    MLflow until the job is resumed. (The error was swallowed without a word.)"""
    spool = spool_path(run_dir, run_id)
    if os.path.exists(spool) and holds_ops(spool):
        append_ops(spool, uri, run_id, [("end", (status,))])
        then = f"`openclaw sync-spool {spool}` marks it {status}"
    else:
        then = "it stays RUNNING there until the job is resumed"
    print(scrub(f"openclaw: could not mark MLflow run {run_id} {status} at {uri} ({error}); {then}."),
          file=sys.stderr, flush=True)
