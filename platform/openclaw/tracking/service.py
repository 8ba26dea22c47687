"""The run's tracking service: every MLflow write of a run, applied in order in the background (a Ray
actor on the driver's node, one per job; the driver starts it).

Rank 0's `Tracker` (in `openclaw.tracking.tracker`) sends small ops here with fire-and-forget actor
calls, so no training step ever waits on MLflow, and a restarted worker group does not import MLflow or
reload the run's events before its first step. The service outlives worker-group restarts and lost
worker nodes, and goes away with the job.

Ops are applied in the order they were sent. While the tracking server is away the service retries
with backoff and keeps the ops queued; nothing is dropped. At the end the driver calls `flush`: what
could not be delivered by then is written to a local spool file (JSON lines of ops), which
`openclaw sync-spool FILE` uploads later.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

import ray

from openclaw.constants import forwarded_env
from openclaw.tracking.spool import append_to_spool

log = logging.getLogger("openclaw")

RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0


class TrackingService:
    """The Ray actor. `submit` only enqueues; a thread applies."""

    def __init__(self, tracking_uri: str, run_id: str, progress=None, spool_path: str | None = None):
        # One quick attempt per request: this service retries itself, with backoff capped at RETRY_MAX_S,
        # so delivery resumes within seconds of a server's return (MLflow's own retries back off to minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_id, self.progress, self.spool_path = tracking_uri, run_id, progress, spool_path
        self._ops: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.outages = 0
        threading.Thread(target=self._run, daemon=True, name="openclaw-tracking").start()

    def submit(self, op: str, *args: Any) -> None:
        with self._cv:
            self._ops.append((op, args))
            self._cv.notify_all()

    def flush(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until every op is applied, or `timeout_s`; spool what is left. Ends the service."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._ops and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self._closed = True
            left = list(self._ops)
        if not left:
            return {"delivered": True, "outages": self.outages}
        path = self.spool_path or f"openclaw-spool-{self.run_id}.jsonl"
        if not os.path.exists(path):
            append_to_spool(path, "run", self.uri, self.run_id)
        for op, args in left:
            append_to_spool(path, op, *args)
        return {"delivered": False, "spool": path, "ops": len(left), "outages": self.outages}

    def _run(self) -> None:
        # MLflow is imported here, on the service's thread, so that the actor answers at once and the
        # import (seconds) overlaps the workers' start.
        from openclaw.tracking.writer import MlflowWriter
        writer = None
        try:  # warm up (read the run's events) while the workers start
            writer = MlflowWriter(self.uri, self.run_id, self.progress)
            writer.events()
        except Exception:
            writer = None
        while True:
            with self._cv:
                while not self._ops and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                op, args = self._ops[0]
            delay, failing = RETRY_MIN_S, False
            while not self._closed:
                try:
                    writer = writer or MlflowWriter(self.uri, self.run_id, self.progress)
                    writer.apply(op, *args)
                    break
                except Exception as e:  # the server is away (or refused): keep the op, retry with backoff
                    if not failing:
                        failing, self.outages = True, self.outages + 1
                        log.warning("MLflow at %s is not answering (%s); metrics are queued and retried",
                                    self.uri, e)
                        if writer is not None:
                            writer._say(f"MLflow at {self.uri} is not answering; queuing metrics, training goes on")
                    time.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
            with self._cv:
                if not self._closed:
                    self._ops.popleft()
                self._cv.notify_all()


def start_service(tracking_uri: str, run_id: str, progress, spool_path: str, node_affinity):
    """The driver starts one service per job on its own node (a worker node may die, the driver's may not)."""
    actor = ray.remote(num_cpus=0, max_restarts=0)(TrackingService)
    env = forwarded_env()  # MLFLOW_TRACKING_USERNAME/PASSWORD (basic auth), MLFLOW_TRACKING_TOKEN, AWS_*, ...
    options = {"runtime_env": {"env_vars": env}} if env else {}
    return actor.options(scheduling_strategy=node_affinity, **options).remote(tracking_uri, run_id, progress,
                                                                                spool_path)
