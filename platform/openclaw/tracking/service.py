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
import itertools
import logging
import os
import threading
import time
from typing import Any

import ray

from openclaw.constants import apply_secret_env, forwarded_env
from openclaw.tracking.redact import public_uri, scrub
from openclaw.tracking.spool import append_ops

log = logging.getLogger("openclaw")

RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0


class TrackingService:
    """The Ray actor. `submit` only enqueues; a thread applies."""

    def __init__(self, tracking_uri: str, run_id: str, progress=None, spool_path: str | None = None,
                 secrets: dict[str, str] | None = None):
        apply_secret_env(secrets or {})  # MLflow's basic-auth or token, the artifact store's keys
        # One quick attempt per request: this service retries itself, with backoff capped at RETRY_MAX_S,
        # so delivery resumes within seconds of a server's return (MLflow's own retries back off to minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_id, self.progress, self.spool_path = tracking_uri, run_id, progress, spool_path
        self._ops: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed, self._stopped = False, threading.Event()
        self._applying = 0
        """How many queued ops (the head of the queue) the service's thread is sending now."""
        self.outages = 0
        self.dead_letter, self.refused = dead_letter_path(spool_path, run_id), 0
        self._writer = None
        threading.Thread(target=self._run, daemon=True, name="openclaw-tracking").start()

    def submit(self, op: str, *args: Any) -> None:
        """Queue an op. One that comes after the flush (an actor call a worker sent as the run ended, run
        after the flush's) goes to the spool: queued, nothing would have sent it."""
        with self._cv:
            if not self._closed:
                self._ops.append((op, args))
                self._cv.notify_all()
                return
        path = self.spool_path or f"openclaw-spool-{self.run_id}.jsonl"
        append_ops(path, self.uri, self.run_id, [(op, args)])
        log.warning("a tracking update (%s) came after the run's flush; it is kept in %s (`openclaw sync-spool %s`)",
                    op, path, path)

    def flush(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until every op is applied, or `timeout_s`; spool what is left. Ends the service. A request
        in flight at the deadline is waited for (it ends within MLflow's request timeout): copied to the
        spool while a slow server was still taking it, its ops were kept twice."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._ops and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self._closed = True
            self._stopped.set()  # a retry's backoff ends now
            in_flight = time.monotonic() + in_flight_s()
            while self._applying and time.monotonic() < in_flight:
                self._cv.wait(timeout=max(0.0, min(1.0, in_flight - time.monotonic())))
            left = list(self._ops)
        outcome = {"outages": self.outages, "refused": self.refused, "dead_letter": self.dead_letter}
        if not left:
            try:  # the run's events in one file, for readers of events.json (best effort: its parts are kept)
                if self._writer is not None:
                    self._writer.write_events_file()
            except Exception as e:
                log.warning("could not write events.json: %s", scrub(e))
            return {**outcome, "delivered": True}
        path = self.spool_path or f"openclaw-spool-{self.run_id}.jsonl"
        if self._writer is not None and any(op == "attempt" for op, _ in left):  # named after this session's
            left.insert(0, ("attempts", (self._writer.attempts,)))
        append_ops(path, self.uri, self.run_id, left)
        return {**outcome, "delivered": False, "spool": path, "ops": len(left)}

    def _next(self) -> tuple[str, tuple, int]:
        """The next op to apply, and how many queued ops it stands for: consecutive events go as one batch."""
        op, args = self._ops[0]
        if op != "event":
            return op, args, 1
        batch = []
        for queued_op, queued_args in itertools.islice(self._ops, 0, 100):
            if queued_op != "event":
                break
            batch.append(list(queued_args))
        return "events", (batch,), len(batch)

    def _run(self) -> None:
        # MLflow is imported here, on the service's thread, so that the actor answers at once and the
        # import (seconds) overlaps the workers' start.
        from openclaw.tracking.writer import MlflowWriter
        try:  # warm up (read the run's events) while the workers start
            self._writer = MlflowWriter(self.uri, self.run_id, self.progress)
            self._writer.events()
        except Exception:
            self._writer = None
        while True:
            with self._cv:
                while not self._ops and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                op, args, n = self._next()
                self._applying = n
            done = self._deliver(op, args, MlflowWriter)
            with self._cv:
                if done:  # delivered (or set aside), the flush's deadline passed or not: not spooled
                    for _ in range(n):
                        self._ops.popleft()
                self._applying = 0
                self._cv.notify_all()

    def _deliver(self, op: str, args: tuple, writer_cls) -> bool:
        """Apply one op: retried with backoff while the server is away; set aside for good if it refuses.
        False where the service closed first (the op is left for the spool)."""
        delay, failing = RETRY_MIN_S, False
        while not self._closed:
            try:
                self._writer = self._writer or writer_cls(self.uri, self.run_id, self.progress)
                self._writer.apply(op, *args)
                return True
            except Exception as e:
                # The server answered no, or no request can carry the op (a TypeError: a value JSON has no
                # type for): retrying cannot help, and must not block the rest.
                status = refused_status(e) or (type(e).__name__ if isinstance(e, TypeError) else None)
                if status is not None:
                    self._set_aside(op, args, status, e)
                    return True
                if not failing:  # the server is away: keep the op, retry with backoff
                    failing, self.outages = True, self.outages + 1
                    log.warning("MLflow at %s is not answering (%s); metrics are queued and retried",
                                public_uri(self.uri), scrub(e))
                    if self._writer is not None:
                        self._writer._say(f"MLflow at {public_uri(self.uri)} is not answering; queuing metrics, "
                                          f"training goes on")
                self._stopped.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
        return False

    def _set_aside(self, op: str, args: tuple, status: int | str, error: Exception) -> None:
        """`status`: the HTTP status of the server's refusal, or the error's type where no request went."""
        ops = [("event", tuple(a)) for a in args[0]] if op == "events" else [(op, args)]
        append_ops(self.dead_letter, self.uri, self.run_id, ops)
        self.refused += len(ops)
        why = f"HTTP {status}" if isinstance(status, int) else status
        log.warning("MLflow at %s refused a tracking update (%s: %s); it is kept in %s", public_uri(self.uri),
                    why, scrub(str(error).splitlines()[0][:200]), self.dead_letter)


def in_flight_s() -> float:
    """How long a flush past its deadline waits for the request in flight: MLflow's request timeout (the
    service's default, or the one forwarded to it), and a margin."""
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")) + 5


def refused_status(error: Exception) -> int | None:
    """The HTTP status of a request the server refused for good (4xx, but not a timeout or throttling)."""
    status_of = getattr(error, "get_http_status_code", None)
    status = status_of() if callable(status_of) else None
    return status if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429) else None


def dead_letter_path(spool_path: str | None, run_id: str) -> str:
    """Beside the spool: the ops MLflow refused, in the spool's format (`openclaw sync-spool` retries them)."""
    folder = os.path.dirname(spool_path) if spool_path else "."
    return os.path.join(folder, f"tracking-deadletter-{run_id}.jsonl")


def start_service(tracking_uri: str, run_id: str, progress, spool_path: str, node_affinity,
                  secrets: dict[str, str] | None = None):
    """The driver starts one service per job on its own node (a worker node may die, the driver's may not).
    Its credentials (`secrets`) are constructor arguments, never in its runtime env."""
    actor = ray.remote(num_cpus=0, max_restarts=0)(TrackingService)
    env = forwarded_env()
    options = {"runtime_env": {"env_vars": env}} if env else {}
    return actor.options(scheduling_strategy=node_affinity, **options).remote(tracking_uri, run_id, progress,
                                                                                spool_path, secrets)
