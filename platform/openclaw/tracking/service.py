"""The run's tracking service: every MLflow write of a run, applied in order in the background.

Rank 0's `Tracker` (in `openclaw.tracking.tracker`) sends small ops here with fire-and-forget actor calls, so no
training step ever waits on MLflow, and a restarted worker group does not import MLflow or reload the
run's events before its first step. The service runs as a Ray actor on the driver's node: it outlives
worker-group restarts and lost worker nodes, and goes away with the job.

Ops are applied in the order they were sent. While the tracking server is away the service retries
with backoff and keeps the ops queued; nothing is dropped. At the end the driver calls `flush`: what
could not be delivered by then is written to a local spool file (JSON lines of ops), which
`openclaw sync-spool FILE` uploads later.
"""
from __future__ import annotations

import collections
import json
import logging
import tempfile
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("openclaw")

RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
ATTEMPT_EVENTS = ("start", "resume", "restart", "resize")


class MlflowWriter:
    """Applies ops to one MLflow run. Plain code, no Ray: the service's thread and `sync-spool` use it."""

    def __init__(self, tracking_uri: str, run_id: str, progress=None):
        from mlflow.tracking import MlflowClient
        self.client, self.run_id, self.progress = MlflowClient(tracking_uri), run_id, progress
        self._events: list[dict[str, Any]] | None = None
        self._published_through = 0
        self._attempts = 0

    def apply(self, op: str, *args: Any) -> None:
        getattr(self, f"_op_{op}")(*args)

    # ---- metrics -------------------------------------------------------------------------------

    def _op_metrics(self, metrics: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric
        # Steps at or before `_published_through` were published by an earlier attempt that ran past the
        # checkpoint this one resumed from (the newer one failed its check): they keep their first record.
        rows = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics
                if m["step"] > self._published_through]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000], synchronous=True)

    def _op_restore(self, pending: list[dict[str, Any]]) -> None:
        """A resume: re-send the checkpoint's pending metrics (MLflow keeps one row per identical
        (key, step, value, timestamp)), then note how far the run's published record already goes."""
        self._published_through = 0
        self._op_metrics(pending)
        history = self.client.get_metric_history(self.run_id, "train/loss")
        self._published_through = max((m.step for m in history), default=0)

    # ---- events --------------------------------------------------------------------------------

    def _op_event(self, kind: str, fields: dict[str, Any], t: float) -> None:
        events = self.events()
        events.append({"event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)),
                       "t": round(t, 3), **fields})
        self.client.log_dict(self.run_id, events, "events.json")
        self.client.set_tag(self.run_id, "openclaw.last_event", json.dumps(events[-1]))

    def _op_attempt(self, fields: dict[str, Any], t: float) -> None:
        """A worker group started: record it as start, resume (a new driver), restart or resize."""
        sizes = [e["world_size"] for e in self.events() if e["event"] in ATTEMPT_EVENTS]
        previous = sizes[-1] if sizes else None
        world = fields["world_size"]
        if previous is None:
            cause = "start"
        elif previous != world:
            cause = "resize"
        else:
            cause = "resume" if self._attempts == 0 else "restart"
        self._attempts += 1
        self._op_event(cause, {**fields, "previous_world_size": previous}, t)
        self._say(f"{cause} at step {fields['resumed_from_step']}/{fields['max_steps']} with {world} worker(s), "
                  f"accumulation {fields['accumulation']}")

    # ---- the end of a run whose server was away (written to the spool by the driver) ----------------

    def _op_end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def _op_finish(self, config: dict[str, Any], checkpoint: str | None) -> None:
        """Log the final model (as the run would have) and close the run."""
        if checkpoint:
            from ray.train import Checkpoint

            from openclaw.config import Config
            from openclaw.launch.session import preflight
            from openclaw.tracking.run import log_final_model
            cfg = Config.model_validate(config)
            log_final_model(cfg, self.run_id, Checkpoint(checkpoint), preflight(cfg))
        self._op_end("FINISHED")

    def events(self) -> list[dict[str, Any]]:
        if self._events is None:  # errors (server away) propagate: the op is retried, nothing overwritten
            if "events.json" not in {a.path for a in self.client.list_artifacts(self.run_id)}:
                self._events = []  # a new run has none yet
            else:
                with tempfile.TemporaryDirectory() as d:
                    with open(self.client.download_artifacts(self.run_id, "events.json", d)) as f:
                        self._events = list(json.load(f))
        return self._events

    def _say(self, message: str) -> None:
        if self.progress is not None:
            from openclaw.tracking.tracker import put_nowait
            put_nowait(self.progress, {"message": message})


class TrackingService:
    """The Ray actor (one per job, on the driver's node). `submit` only enqueues; a thread applies."""

    def __init__(self, tracking_uri: str, run_id: str, progress=None, spool_path: str | None = None):
        import os
        # One quick attempt per request: this service retries itself, with backoff capped at RETRY_MAX_S,
        # so delivery resumes within seconds of a server's return (MLflow's own retries back off to minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_id, self.progress, self.spool_path = tracking_uri, run_id, progress, spool_path
        self._ops: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._stop_reason: str | None = None
        self._checkpoint_request = self._checkpoint_answered = 0
        self.outages = 0
        threading.Thread(target=self._run, daemon=True, name="openclaw-tracking").start()

    def submit(self, op: str, *args: Any) -> None:
        with self._cv:
            self._ops.append((op, args))
            self._cv.notify_all()

    # ---- the driver's requests to the workers (rank 0 polls `control`) ---------------------------

    def request_stop(self, reason: str) -> None:
        """The driver was told to stop: the workers checkpoint at their next step and return."""
        self._stop_reason = reason

    def request_checkpoint(self) -> int:
        """Ask for a checkpoint at the next step (before a planned resize); returns the request's id."""
        self._checkpoint_request += 1
        return self._checkpoint_request

    def checkpoint_answered(self, request: int, step: int) -> None:
        self._checkpoint_answered = max(self._checkpoint_answered, request)

    def checkpoint_request_done(self, request: int) -> bool:
        return self._checkpoint_answered >= request

    def control(self) -> dict[str, Any]:
        return {"stop": self._stop_reason, "checkpoint": self._checkpoint_request}

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
        import os
        if not os.path.exists(path):
            append_to_spool(path, "run", self.uri, self.run_id)
        for op, args in left:
            append_to_spool(path, op, *args)
        return {"delivered": False, "spool": path, "ops": len(left), "outages": self.outages}

    def _run(self) -> None:
        writer = None
        try:  # warm up (import MLflow, read the run's events) while the workers start
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


def start_service(tracking_uri: str, run_id: str, progress, spool_path: str, node_affinity, job_name: str):
    """The driver starts one service per job on its own node (a worker node may die, the driver's may not)."""
    import ray

    from openclaw.constants import forwarded_env
    actor = ray.remote(num_cpus=0, max_restarts=0)(TrackingService)
    env = forwarded_env()  # MLFLOW_TRACKING_USERNAME/PASSWORD (basic auth), MLFLOW_TRACKING_TOKEN, AWS_*, ...
    options = {"runtime_env": {"env_vars": env}} if env else {}
    name = f"{service_name_prefix(job_name)}{uuid.uuid4().hex[:8]}"  # unique: a resumed job may reuse its name
    return actor.options(name=name, scheduling_strategy=node_affinity, **options).remote(
        tracking_uri, run_id, progress, spool_path)


def service_name_prefix(job_name: str) -> str:
    """How the service's actor name starts, in the job's namespace: a sweep's driver finds a trial's
    service by it, to flush it before the scheduler stops the trial."""
    return f"openclaw-tracking-{job_name}-"


def append_to_spool(path: str, op: str, *args: Any) -> None:
    """One op, as a JSON line, at the end of a spool file (`sync_spool` applies them in order)."""
    with open(path, "a") as f:
        f.write(json.dumps({"op": op, "args": list(args)}) + "\n")


def sync_spool(path: str, tracking_uri: str | None = None) -> int:
    """Upload a spool file's ops in order (`openclaw sync-spool`). Returns how many were applied."""
    with open(path) as f:
        ops = [json.loads(line) for line in f if line.strip()]
    if not ops:
        return 0
    header = ops[0]
    if header["op"] != "run":
        raise ValueError(f"{path} is not an openclaw spool file (it must start with a 'run' line)")
    writer = MlflowWriter(tracking_uri or header["args"][0], header["args"][1])
    for item in ops[1:]:
        writer.apply(item["op"], *item["args"])
    return len(ops) - 1
