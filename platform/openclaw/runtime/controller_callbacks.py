"""Callbacks that run in Ray Train's controller process (the driver hands them to `RunConfig`):
settle lost nodes before a restart, say when a worker group fails to start, keep one node-drain
watcher for the whole run, and keep openclaw's failure budgets."""
from __future__ import annotations

import logging
import os
import re
import threading

from ray.exceptions import RayActorError
from ray.train import ControllerError, PreemptionError

from openclaw.errors import FailureBudgetSpent, OpenClawError, WorkerPreempted
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
        self.count, self._seen = 0, None

    def after_controller_state_update(self, previous_state, current_state):
        error = getattr(current_state, "training_failed_error", None)
        if error is None or error is self._seen or "WorkerGroupStartup" not in _error_chain(error):
            return  # (Ray's controller sets the same state again on each pass while it waits for resources)
        self._seen = error
        self.count += 1
        put_nowait(self.progress, {"message": start_failure_message(error, self.count)})


def start_failure_message(error: BaseException, count: int) -> str:
    """The progress line for a failed worker-group start: the innermost error's first sentence (the
    outer ones only say that the controller failed)."""
    inner = error
    for _ in range(6):
        deeper = getattr(inner, "controller_failure", None) or inner.__cause__
        if deeper is None:
            break
        inner = deeper
    said = " ".join(str(inner).split())
    said = said.split(". Potential causes")[0].split(". ")[0].rstrip(".")[:200] or type(inner).__name__
    return f"worker group start failed ({count} so far): {said}; Ray Train retries"


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
        said = _summary(causes)
        decision = failure_decision(self.counts, preempted, said, **self.limits,
                                    final=any(getattr(c, "final", False) for c in causes),
                                    key=None if _died(_root(causes)) else _VOLATILE.sub("#", said))
        if isinstance(decision, GiveUp):
            if self.progress is not None:
                put_nowait(self.progress, {"message": f"giving up: {decision.message}"})
            # openclaw's own error (a non-finite loss, bad data) says best what to change: end with it; not
            # a preemption's, which says the run resumes (its budget is what is spent)
            ours = next((c for c in causes if isinstance(c, OpenClawError) and not isinstance(c, WorkerPreempted)),
                        None)
            raise ControllerError(ours or FailureBudgetSpent(decision.message))
        self.counts = decision.counts


def _causes(error: BaseException) -> list[BaseException]:
    """The errors behind a failed attempt: each worker's, or the controller's."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return list(failures.values())
    inner = getattr(error, "controller_failure", None)
    return [inner] if inner is not None else [error]


_COLLATERAL = re.compile(r"gloo|nccl|connection closed by peer|connection reset|processgroup|broken pipe", re.I)
"""A collective's failure on the ranks whose peer died first: a consequence, not the cause."""
_VOLATILE = re.compile(r"0x[0-9a-f]+|[0-9a-f]{12,}|\d+(?:\.\d+)?", re.I)
"""What differs between two reports of one error (ports, addresses, ids, free memory): left out when
`failure.max_same_error` compares them."""


def _root(causes: list[BaseException]) -> BaseException:
    """The cause most likely the failure's own, first by rank within a kind: openclaw's own errors, then
    a worker's other errors, then a worker's death, then a collective's failure caused by a peer's."""
    def kind(e: BaseException) -> int:
        if isinstance(e, OpenClawError):
            return 0
        if _died(e):
            return 2
        return 3 if _COLLATERAL.search(str(e)) else 1
    return min(causes, key=kind)


def _died(cause: BaseException) -> bool:
    """Whether the failure's root cause is a worker process that died (killed, out of host memory, its node
    lost) rather than an error its code raised: a retry need not meet it again, so `failure.max_failures`
    bounds it and `failure.max_same_error` does not count it (three random SIGKILLs in a row, or three lost
    nodes, are not one bug)."""
    return isinstance(cause, RayActorError) or type(cause).__name__ == "WorkerHealthCheckFailedError"


def _summary(causes: list[BaseException]) -> str:
    """One line that names the error the same way whenever it recurs (its root cause's, `_root`)."""
    first = _root(causes)
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
    """Ray Train's drain watcher (a poll thread), re-aimable at each new worker group: only `retarget`,
    `stop` and the lock around a poll are openclaw's."""

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
            self._failure_domain_map = self._build_failure_domain_map(self._node_to_ranks) if node_to_ranks else {}
            self._last_drained = {}

    def stop(self) -> None:
        self._stop_event.set()


class PreemptionNotices(WorkerGroupCallback, ControllerCallback):
    """One node-drain watcher for the whole run, in the controller's process, where Ray Train starts one
    actor per worker group.

    Ray Train's watcher tells the workers when a node of theirs is being drained (a spot reclaim, an
    autoscaler scale-down), which `ray.train.get_preemption_info` returns and openclaw answers with a
    checkpoint at the next step. Ray starts it as a new actor process after every worker-group start: a
    process start and imports of `ray.train` (with Ray Data and pandas), about 2.4 s of CPU on the CPUs
    the new workers start on. The watcher is a poll thread around a GCS query, so this callback runs Ray's
    class in the controller's own process, which has all of it imported: started at the first worker
    group, re-aimed at each new one, stopped with the controller. It lives and dies with the run, so
    nothing needs to restart it. openclaw turns Ray's own off (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, see
    `constants.RAY_TRAIN_DEFAULTS`) unless the user set it. The poll interval is Ray's
    `RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`.
    """

    def __init__(self):
        self._watcher: RunPreemptionWatcher | None = None

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
                self._watcher = RunPreemptionWatcher(node_to_ranks={}, poll_interval_s=poll_interval_s)
            self._watcher.retarget(node_to_ranks, actors)
        except Exception as e:  # training goes on; a drain then ends as a worker failure, from the last checkpoint
            log.warning("openclaw: no preemption notices for this worker group: %s", e)

    def _stand_down(self, *_args) -> None:
        if self._watcher is not None:
            self._watcher.retarget({}, {})

    before_worker_group_shutdown = after_worker_group_abort = _stand_down

    def _stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()

    async def before_controller_shutdown(self) -> None:
        self._stop()

    def before_controller_abort(self) -> None:
        self._stop()
