"""The job's control plane: the driver's requests to its workers (a Ray actor on the driver's node, one
per job; rank 0 polls it). Two requests exist:

- stop: the driver was told to stop (SIGTERM or Ctrl-C on `openclaw train`, or a sweep's scheduler
  stopping a trial early). The workers checkpoint at their next step and return.
- checkpoint: a checkpoint at the next step, before a planned resize (a node joined). Requests are
  numbered; rank 0 reports which one a checkpoint answered, and the driver waits for that.

The actor outlives worker-group restarts: a request made before a restart is seen by the next group.
A sweep finds a trial's control plane by the trial's job name (`ask_to_stop`).
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import ray

NAME_PREFIX = "openclaw-control-"


class Control:
    def __init__(self) -> None:
        self._stop_reason: str | None = None
        self._checkpoint_request = self._checkpoint_answered = 0

    def request_stop(self, reason: str) -> None:
        """The workers checkpoint at their next step and return."""
        self._stop_reason = reason

    def request_checkpoint(self) -> int:
        """Ask for a checkpoint at the next step; returns the request's id."""
        self._checkpoint_request += 1
        return self._checkpoint_request

    def checkpoint_answered(self, request: int, step: int | None) -> None:
        """Rank 0: a checkpoint (at `step`; None: the one the group resumed from) answers `request`."""
        self._checkpoint_answered = max(self._checkpoint_answered, request)

    def checkpoint_request_done(self, request: int) -> bool:
        return self._checkpoint_answered >= request

    def state(self) -> dict[str, Any]:
        """What rank 0 polls: {"stop": reason or None, "checkpoint": the newest request's id}."""
        return {"stop": self._stop_reason, "checkpoint": self._checkpoint_request}


def start_control(job_name: str, node_affinity):
    """The driver starts one per job, on its own node (a worker node may die, the driver's may not).
    The name is unique (a resumed job reuses its job name) and starts with the job's name."""
    actor = ray.remote(num_cpus=0, max_restarts=0)(Control)
    return actor.options(name=f"{NAME_PREFIX}{job_name}-{uuid.uuid4().hex[:8]}",
                         scheduling_strategy=node_affinity).remote()


def ask_to_stop(job_name: str, reason: str) -> None:
    """Ask the job named `job_name` (in this Ray namespace) to checkpoint at its next step and return."""
    prefix = f"{NAME_PREFIX}{job_name}-"
    for name in ray.util.list_named_actors():
        suffix = name[len(prefix):]
        if name.startswith(prefix) and len(suffix) == 8 and all(c in "0123456789abcdef" for c in suffix):
            with contextlib.suppress(Exception):  # a control plane from an earlier attempt may be gone already
                ray.get(ray.get_actor(name).request_stop.remote(reason), timeout=30)


def wait_for_checkpoint(control, timeout_s: float) -> bool:
    """Driver: ask the workers for a checkpoint at their next step and wait (at most `timeout_s`) until
    it is saved."""
    request = ray.get(control.request_checkpoint.remote())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(control.checkpoint_request_done.remote(request)):
            return True
        time.sleep(0.1)
    return False
