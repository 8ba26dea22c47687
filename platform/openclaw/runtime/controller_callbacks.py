"""Callbacks that run in Ray Train's controller process (the driver hands them to `RunConfig`):
settle lost nodes before a restart, say when a worker group fails to start, keep one node-drain
watcher for the whole run, and keep openclaw's failure budgets."""
from __future__ import annotations

import logging
import os
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.exceptions import RayActorError
from ray.train import ControllerError, PreemptionError

from openclaw.errors import ConfigError, FailureBudgetSpent, OpenClawError, WorkerPreempted
from openclaw.runtime.cluster_view import settle_lost_nodes
from openclaw.runtime.policies import FailureCounts, GiveUp, failure_decision
from openclaw.runtime.ray_private import (
    DEFAULT_PREEMPTION_POLL_INTERVAL_S,
    PREEMPTION_POLL_INTERVAL_S_ENV_VAR,
    ControllerCallback,
    PreemptionWatcher,
    WorkerGroupCallback,
)
from openclaw.tracking.tracker import put_nowait

log = logging.getLogger("openclaw")


class SettleLostNodes(ControllerCallback):
    """Runs before the controller acts on a worker failure.

    A worker on a lost node is seen dead at once, but the GCS declares the node dead only after its
    health checks run out. A restart decided in between is sized for the dead node too, and waits out
    the whole worker-start timeout. A raylet that refuses the connection tells us sooner: then wait
    for the GCS to agree (no wait at all when only a process died) and refresh the resource view.
    """

    def __init__(self, wait_s: float):
        self.wait_s = wait_s

    def before_controller_execute_failure_decision(self, failure_decision):
        try:
            lost = settle_lost_nodes(self.wait_s)
            if lost:
                log.warning("openclaw: %d node(s) lost; restarting without them", len(lost))
        except Exception as e:  # best effort: Ray's own path still recovers, only later
            log.warning("openclaw: could not settle lost nodes: %s", e)
        return None


class ReportStartFailures(ControllerCallback):
    """Says on the driver's progress stream when a worker group failed to start and Ray Train retries
    (a start timeout or a failed start): a run that loops on such retries is visibly stuck, not silent."""

    def __init__(self, progress):
        self.progress = progress
        self.count = 0

    def after_controller_state_update(self, previous_state, current_state):
        error = getattr(current_state, "training_failed_error", None)
        if error is None or "WorkerGroupStartup" not in _error_chain(error):
            return
        self.count += 1
        put_nowait(self.progress, {"message": f"worker group start failed ({self.count} so far): "
                                              f"{str(error).splitlines()[0][:200]}; Ray Train retries"})


class FailureBudget(ControllerCallback):
    """openclaw's failure budgets (`runtime.policies.failure_decision`), kept here because only the controller
    sees every failed attempt's error. The driver sets Ray Train's own limits to unlimited, so these decide:
    preemptions (a worker that got SIGTERM and checkpointed, a drained node) have a budget of their own and
    never spend `failure.max_failures`, and the same error in `failure.max_same_error` attempts in a row
    ends the run with it. A spent budget ends the run through Ray's failure path (a ControllerError)."""

    def __init__(self, max_failures: int, max_preemptions: int, max_same_error: int, progress=None):
        self.limits = dict(max_failures=max_failures, max_preemptions=max_preemptions, max_same_error=max_same_error)
        self.progress, self.counts, self._seen = progress, FailureCounts(), None

    def after_controller_state_update(self, previous_state, current_state):
        error = getattr(current_state, "training_failed_error", None)
        if error is None or error is self._seen or type(current_state).__name__ not in ("RestartingState",
                                                                                        "ReschedulingState"):
            return
        self._seen = error
        if "WorkerGroupStartup" in _error_chain(error):  # a start that failed: Ray retries it under its own limit
            return
        causes = _causes(error)
        preempted = any(isinstance(c, (WorkerPreempted, PreemptionError)) or getattr(c, "preempted", False)
                        for c in causes)
        decision = failure_decision(self.counts, preempted, _summary(causes), **self.limits,
                                    config_error=any(isinstance(c, ConfigError) for c in causes))
        if isinstance(decision, GiveUp):
            if self.progress is not None:
                put_nowait(self.progress, {"message": f"giving up: {decision.message}"})
            # openclaw's own error (a non-finite loss, bad data) says best what to change: end with it
            ours = next((c for c in causes if isinstance(c, OpenClawError)), None)
            raise ControllerError(ours or FailureBudgetSpent(decision.message))
        self.counts = decision.counts


def _causes(error: BaseException) -> list[BaseException]:
    """The errors behind a failed attempt: each worker's, or the controller's."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return list(failures.values())
    inner = getattr(error, "controller_failure", None)
    return [inner] if inner is not None else [error]


def _summary(causes: list[BaseException]) -> str:
    """One line that names the error the same way whenever it recurs (the first worker's, by rank)."""
    first = causes[0]
    if isinstance(first, RayActorError):  # a dead worker: which one (its id) does not make it another error
        return "a training worker died (RayActorError)"
    return f"{type(first).__name__}: {str(first).strip().splitlines()[0][:300] if str(first).strip() else ''}"


def _error_chain(error: BaseException) -> str:
    names, seen = [], error
    for _ in range(6):
        if seen is None:
            break
        names.append(type(seen).__name__ + ": " + str(seen)[:200])
        seen = getattr(seen, "controller_failure", None) or seen.__cause__ or seen.__context__
    return " | ".join(names)


class RunPreemptionWatcher(PreemptionWatcher):
    """Ray Train's drain watcher (a Ray actor), re-aimable at each new worker group: only `retarget` and
    the lock around a poll are openclaw's."""

    def __init__(self, **kwargs):
        self._lock = threading.Lock()
        super().__init__(**kwargs)

    def _poll_once(self) -> None:
        with self._lock:
            super()._poll_once()

    def retarget(self, node_to_ranks: dict, worker_actors_by_rank: dict) -> None:
        """Watch the nodes of a new worker group. A drain still in progress is announced to it again."""
        with self._lock:
            self._node_to_ranks = {n: sorted(r) for n, r in node_to_ranks.items()}
            self._worker_actors_by_rank = dict(worker_actors_by_rank)
            self._failure_domain_map = self._build_failure_domain_map(self._node_to_ranks)
            self._last_drained = {}

    def adopt(self, node_to_ranks: dict, worker_actors_by_rank: dict) -> None:
        """`retarget`, where this watcher watches nothing: after Ray restarted it (its constructor's
        arguments name no node). A watcher already aimed keeps what it has seen."""
        with self._lock:
            aimed = bool(self._node_to_ranks)
        if not aimed:
            self.retarget(node_to_ranks, worker_actors_by_rank)


REAIM_S = 2.0
"""How often the controller hands the drain watcher its group again, which a watcher Ray restarted takes
(`RunPreemptionWatcher.adopt`): the longest a restarted watcher watches nothing."""


class PreemptionNotices(WorkerGroupCallback, ControllerCallback):
    """One node-drain watcher for the whole run, where Ray Train starts one per worker group.

    Ray Train's watcher tells the workers when a node of theirs is being drained (a spot reclaim, an
    autoscaler scale-down), which `ray.train.get_preemption_info` returns and openclaw answers with a
    checkpoint at the next step. Ray starts it as a new actor process after every worker-group start,
    so each restart also pays for a process start and a `ray` import, on the same CPUs as the new
    workers: on 2 cores about 0.8 s of a 5 s restart. This callback starts Ray's watcher once, at the
    first start, on the controller's node, and re-aims it at each new group. Ray restarts a watcher
    whose process died, with its constructor's empty arguments: every `REAIM_S` the controller's poll
    hands it the group again, which only a watcher that watches nothing takes. openclaw turns Ray's own off
    (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, see `constants.RAY_TRAIN_DEFAULTS`) unless the user set it.
    The poll interval is Ray's `RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`.
    """

    def __init__(self):
        self._watcher = None
        self._targets: tuple[dict, dict] | None = None
        self._aimed_at = 0.0

    def after_worker_group_start(self, worker_group) -> None:
        node_to_ranks: dict[str, list[int]] = {}
        actors = {}
        for w in worker_group.get_workers():
            rank = w.distributed_context.world_rank
            node_to_ranks.setdefault(w.metadata.node_id, []).append(rank)
            actors[rank] = w.actor
        try:
            if self._watcher is None:
                # Ray's knob, read here in the controller as Ray's own callback reads it.
                poll_interval_s = float(os.environ.get(PREEMPTION_POLL_INTERVAL_S_ENV_VAR,
                                                       DEFAULT_PREEMPTION_POLL_INTERVAL_S))
                # No actor handle among the constructor's arguments: Ray would keep them in the object store,
                # which a restart of the watcher (max_restarts) needs alive, and log an error line at every
                # run's start saying so (ray-project/ray#53727). The handles go in the first `retarget`.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self._watcher = ray.remote(num_cpus=0, max_restarts=-1, scheduling_strategy=here)(
                    RunPreemptionWatcher).remote(node_to_ranks={}, poll_interval_s=poll_interval_s)
            self._watcher.retarget.remote(node_to_ranks, actors)
            self._targets, self._aimed_at = (node_to_ranks, actors), time.monotonic()
        except Exception as e:  # training goes on; a drain then ends as a worker failure, from the last checkpoint
            log.warning("openclaw: no preemption notices for this worker group: %s", e)

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        if self._watcher is None or self._targets is None or time.monotonic() - self._aimed_at < REAIM_S:
            return
        self._aimed_at = time.monotonic()
        try:
            self._watcher.adopt.remote(*self._targets)
        except Exception:  # the next poll tries again
            pass

    def _stand_down(self, *_args) -> None:
        self._targets = None
        if self._watcher is not None:
            try:
                self._watcher.retarget.remote({}, {})
            except Exception:
                pass

    before_worker_group_shutdown = after_worker_group_abort = _stand_down

    def _stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                ray.kill(watcher)
            except Exception:
                pass

    async def before_controller_shutdown(self) -> None:
        self._stop()

    def before_controller_abort(self) -> None:
        self._stop()
