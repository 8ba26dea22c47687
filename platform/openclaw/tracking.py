"""Rank-0 side effects go through one tracker; every other rank holds a `NullTracker`.

Metrics are buffered with their timestamps and published to MLflow only together with the
checkpoint that covers them (`publish`). A restart replays from that checkpoint, so a step's metric is
published once: the failed attempt's later metrics were never sent, and the checkpoint's own pending
metrics are re-sent with identical (key, step, value, timestamp), which MLflow de-duplicates.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("openclaw")


class NullTracker:
    """What non-zero ranks hold: every call is a no-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def publish(self) -> None: ...
    def event(self, kind: str, **fields: Any) -> None: ...
    def progress(self, line: dict[str, Any]) -> None: ...
    def pending(self) -> list[dict[str, Any]]: return []
    def last_world_size(self) -> int | None: return None
    def restore_pending(self, pending: list[dict[str, Any]]) -> None: ...
    def rollback(self, pending: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class Tracker(NullTracker):
    def __init__(self, tracking_uri: str, run_id: str, progress_queue=None):
        from mlflow.tracking import MlflowClient
        self.client, self.run_id, self.queue = MlflowClient(tracking_uri), run_id, progress_queue
        self._pending: list[dict[str, Any]] = []
        self._published_through = 0
        self._events: list[dict[str, Any]] = self._load_events()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._published_through:  # replayed past a checkpoint that turned out invalid
            return
        ts = int(time.time() * 1000)
        self._pending += [{"key": k, "value": float(v), "step": step, "timestamp": ts} for k, v in metrics.items()]

    def publish(self) -> None:
        """Send the buffered metrics; call only after the checkpoint that covers them is committed."""
        if not self._pending:
            return
        from mlflow.entities import Metric
        metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in self._pending]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)
        self._pending = []

    def pending(self) -> list[dict[str, Any]]:
        return list(self._pending)

    def restore_pending(self, pending: list[dict[str, Any]]) -> None:
        """On resume: re-send the checkpoint's pending metrics (MLflow drops exact duplicates), and note
        how far this run's metrics already go. A resume from an older checkpoint than the newest (which
        failed its check) replays steps that were published once already; those keep their record."""
        self._pending = list(pending) + self._pending
        self.publish()
        history = self.client.get_metric_history(self.run_id, "train/loss")
        self._published_through = max((m.step for m in history), default=0)

    def rollback(self, pending: list[dict[str, Any]]) -> None:
        """Drop what was logged after the checkpoint rolled back to; keep that checkpoint's own pending metrics."""
        self._pending = list(pending)
        self.publish()

    def event(self, kind: str, **fields: Any) -> None:
        """Record a lifecycle event (start, restart, resize, checkpoint) on the run as `events.json`."""
        now = time.time()
        self._events.append({"event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                             "t": round(now, 3), **fields})
        try:
            self.client.log_dict(self.run_id, self._events, "events.json")
            self.client.set_tag(self.run_id, "openclaw.last_event", json.dumps(self._events[-1]))
        except Exception as e:  # best effort: an event must never stop training
            log.warning("could not record event %s on MLflow run %s: %s", kind, self.run_id, e)

    def last_world_size(self) -> int | None:
        """The world size of the previous attempt, which may have run past the checkpoint we resume from."""
        sizes = [e["world_size"] for e in self._events if e["event"] in ("start", "restart", "resize")]
        return sizes[-1] if sizes else None

    def progress(self, line: dict[str, Any]) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(line)
        except Exception:  # full queue or driver gone: progress lines are disposable
            pass

    def _load_events(self) -> list[dict[str, Any]]:
        import tempfile
        try:
            with tempfile.TemporaryDirectory() as d:
                return list(json.load(open(self.client.download_artifacts(self.run_id, "events.json", d))))
        except Exception:  # a new run has none yet
            return []

    def close(self) -> None:
        self.publish()
