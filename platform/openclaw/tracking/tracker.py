"""Rank-0 side effects go through one tracker (worker process); every other rank holds a `NullTracker`.

Metrics are buffered with their timestamps and published only together with the checkpoint that
covers them (`publish`). A restart replays from that checkpoint, so a step's metric is published once:
the failed attempt's later metrics were never sent, and the checkpoint's own pending metrics are
re-sent with identical (key, step, value, timestamp), which MLflow de-duplicates.

The tracker itself does no I/O: it hands ops to the job's `TrackingService` (a Ray actor on the
driver's node, see `openclaw.tracking.service`) without waiting, and puts progress lines on the
driver's queue. So tracking adds no MLflow latency to a step, and none to a restart.
"""
from __future__ import annotations

import base64
import time
from typing import Any


def put_nowait(queue, line: dict[str, Any]) -> None:
    """Put a line on a `ray.util.queue.Queue` without waiting for the reply (a full queue drops it:
    progress lines are disposable)."""
    try:
        queue.actor.put_nowait.remote(line)
    except Exception:
        pass


class NullTracker:
    """What non-zero ranks hold: every call is a no-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def publish(self, through_step: int | None = None) -> None: ...
    def event(self, kind: str, **fields: Any) -> None: ...
    def params(self, params: dict[str, str]) -> None: ...
    def attempt(self, **fields: Any) -> None: ...
    def progress(self, line: dict[str, Any]) -> None: ...
    def pending(self) -> list[dict[str, Any]]: return []
    def restore_pending(self, pending: list[dict[str, Any]]) -> None: ...
    def rollback(self, pending: list[dict[str, Any]]) -> None: ...
    def artifact(self, path: str, data: bytes) -> None: ...
    def close(self) -> None: ...


class ProgressOnlyTracker(NullTracker):
    """Rank 0's tracker with `tracking.enabled: false`: progress lines on the console, nothing to MLflow."""

    def __init__(self, progress_queue=None):
        self.queue = progress_queue

    def progress(self, line: dict[str, Any]) -> None:
        if self.queue is not None:
            put_nowait(self.queue, line)


def make_tracker(rank: int, enabled: bool, service, progress_queue=None) -> NullTracker:
    """Rank 0 tracks (or, with tracking off, only prints progress); every other rank gets a null tracker."""
    if rank != 0:
        return NullTracker()
    return Tracker(service, progress_queue) if enabled else ProgressOnlyTracker(progress_queue)


class Tracker(NullTracker):
    def __init__(self, service, progress_queue=None):
        self.service, self.queue = service, progress_queue
        self._pending: list[dict[str, Any]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._pending += [{"key": k, "value": float(v), "step": step, "timestamp": ts} for k, v in metrics.items()]

    def publish(self, through_step: int | None = None) -> None:
        """Send the buffered metrics (of steps up to `through_step`); call only after the checkpoint that
        covers them is committed."""
        due = [m for m in self._pending if through_step is None or m["step"] <= through_step]
        if due:
            self.service.submit.remote("metrics", due)
            self._pending = self._pending[len(due):]

    def pending(self) -> list[dict[str, Any]]:
        return list(self._pending)

    def restore_pending(self, pending: list[dict[str, Any]]) -> None:
        """On resume: the checkpoint's pending metrics are re-sent; the service also notes how far the
        run's record already goes, so steps replayed past an invalid newer checkpoint keep their first record."""
        self.service.submit.remote("restore", list(pending))

    def rollback(self, pending: list[dict[str, Any]]) -> None:
        """Drop what was logged after the checkpoint rolled back to; keep that checkpoint's own pending metrics."""
        self._pending = list(pending)
        self.publish()

    def event(self, kind: str, **fields: Any) -> None:
        """Record a lifecycle event (checkpoint, skipped batch, ...) in the run's events (`openclaw.events`)."""
        self.service.submit.remote("event", kind, fields, time.time())

    def params(self, params: dict[str, str]) -> None:
        """Log run params a worker resolved (MLflow keeps each param's first value)."""
        self.service.submit.remote("params", params)

    def attempt(self, **fields: Any) -> None:
        """A worker group started; the service names it start, resume, restart or resize."""
        self.service.submit.remote("attempt", fields, time.time())

    def progress(self, line: dict[str, Any]) -> None:
        if self.queue is not None:
            put_nowait(self.queue, line)

    def artifact(self, path: str, data: bytes) -> None:
        """Log a file of the run at `path` (e.g. `profile/report.html`), in order with the other ops. Sent as
        base64 text, so that the op also keeps in the spool (JSON lines) while MLflow is away."""
        self.service.submit.remote("artifact", path, base64.b64encode(data).decode("ascii"))

    def close(self) -> None:
        self.publish()
