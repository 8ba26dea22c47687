"""Watching the cluster's nodes. `NodeWatcher` runs in the driver; `SettleLostNodes`, `ReportStartFailures`
and `PreemptionNotices` run in Ray Train's controller.

Elastic runs: refresh Ray's view of the cluster the moment a node joins or dies.

Ray Train V2's elastic policy sizes a (re)started worker group from the node resources held by Ray
Data's AutoscalingCoordinator, which re-reads the cluster only every 20 s. For up to 20 s after a node
dies, the policy still counts the dead node's resources, asks for a worker group that cannot be
placed, and waits out a whole worker-start timeout before it retries smaller (Ray's default is 60 s:
74 s from node death to the first step, measured in the issue). Polling the GCS node table is cheap;
on a change the watcher asks the coordinator to recompute at once, so the restart sees the truth.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("openclaw")


def _alive_nodes() -> frozenset[str]:
    import ray
    return frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])


def _coordinator():
    """Ray Data's AutoscalingCoordinator (a named, detached actor), created on this node if missing."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    return get_or_create_autoscaling_coordinator()


def _refresh_coordinator() -> None:
    import ray
    ray.get(_coordinator().get_reserved_resources.remote("openclaw-node-watch", recompute=True), timeout=10)


def pin_coordinator() -> None:
    """Create the coordinator from the driver, so that it lives on the driver's node.

    Whoever asks first creates it, pinned (hard node affinity) to the asker's node. If that is a worker
    node that later dies, the detached actor cannot be restarted anywhere and every elastic decision
    after the loss fails ("The actor died unexpectedly"), which is what we saw without this.
    """
    try:
        _coordinator()
    except Exception as e:  # a Ray upgrade that moved it: elastic runs still work, with slower recovery
        log.warning("could not pin Ray's autoscaling coordinator to the driver's node: %s", e)


class NodeWatcher(threading.Thread):
    """`before_grow` runs when nodes join, before Ray is told: the driver has the workers checkpoint,
    so that the resize into the new nodes replays no steps."""

    def __init__(self, interval_s: float, on_change: Callable[[str], None] | None = None,
                 before_grow: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="openclaw-node-watch")
        self.interval_s, self.on_change, self.before_grow = interval_s, on_change, before_grow
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            known = _alive_nodes()
        except Exception as e:  # best effort: without the watcher, Ray's own (slower) path still works
            log.warning("node watcher disabled: %s", e)
            return
        while not self._stop_event.wait(self.interval_s):
            try:
                now = _alive_nodes()
                if now == known:
                    continue
                lost, joined = known - now, now - known
                known = now
                if joined and self.before_grow:
                    self.before_grow()
                _refresh_coordinator()
                if self.on_change:
                    self.on_change(f"cluster changed: {len(lost)} node(s) lost, {len(joined)} joined; "
                                   f"{len(now)} alive")
            except Exception as e:
                log.warning("node watcher: %s", e)

    def stop(self) -> None:
        self._stop_event.set()


def _raylet_answers(node: dict, timeout_s: float = 1.0) -> bool:
    import socket
    try:
        with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=timeout_s):
            return True
    except OSError:
        return False


def _settle_lost_nodes(wait_s: float) -> list[str]:
    """If a node the GCS still lists as alive no longer answers, wait (at most `wait_s`) until the GCS
    declares it dead, then refresh the coordinator. Returns the ids of the nodes found unreachable."""
    import time

    import ray
    lost = [n["NodeID"] for n in ray.nodes() if n["Alive"] and not _raylet_answers(n)]
    deadline = time.monotonic() + wait_s
    while lost and time.monotonic() < deadline and not _alive_nodes().isdisjoint(lost):
        time.sleep(0.2)  # polling the GCS, which decides node death on its own health-check clock
    if lost:
        _refresh_coordinator()
    return lost


try:
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
except ImportError:  # pragma: no cover - a Ray without Train V2's callback interface
    ControllerCallback = WorkerGroupCallback = object  # type: ignore[misc,assignment]


class SettleLostNodes(ControllerCallback):
    """Runs in Ray Train's controller, before it acts on a worker failure.

    A worker on a lost node is seen dead at once, but the GCS declares the node dead only after its
    health checks run out. A restart decided in between is sized for the dead node too, and waits out
    the whole worker-start timeout. A raylet that refuses the connection tells us sooner: then wait
    for the GCS to agree (no wait at all when only a process died) and refresh the resource view.
    """

    def __init__(self, wait_s: float):
        self.wait_s = wait_s

    def before_controller_execute_failure_decision(self, failure_decision):
        try:
            lost = _settle_lost_nodes(self.wait_s)
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
        from openclaw.tracking.tracker import put_nowait
        put_nowait(self.progress, {"message": f"worker group start failed ({self.count} so far): "
                                              f"{str(error).splitlines()[0][:200]}; Ray Train retries"})


def _error_chain(error: BaseException) -> str:
    names, seen = [], error
    for _ in range(6):
        if seen is None:
            break
        names.append(type(seen).__name__ + ": " + str(seen)[:200])
        seen = getattr(seen, "controller_failure", None) or seen.__cause__ or seen.__context__
    return " | ".join(names)


def _preemption_watcher_cls():
    """Ray Train's drain watcher, re-aimable at each new worker group (the class is Ray's; only `retarget`
    and the lock around a poll are openclaw's)."""
    from ray.train.v2._internal.execution.preemption import PreemptionWatcher

    class RunPreemptionWatcher(PreemptionWatcher):
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

    return RunPreemptionWatcher


class PreemptionNotices(WorkerGroupCallback, ControllerCallback):
    """One node-drain watcher for the whole run, where Ray Train starts one per worker group.

    Ray Train's watcher tells the workers when a node of theirs is being drained (a spot reclaim, an
    autoscaler scale-down), which `ray.train.get_preemption_info` returns and openclaw answers with a
    checkpoint at the next step. Ray starts it as a new actor process after every worker-group start,
    so each restart also pays for a process start and a `ray` import, on the same CPUs as the new
    workers: on 2 cores about 0.8 s of a 5 s restart. This callback starts Ray's watcher once, at the
    first start, and re-aims it at each new group; openclaw turns Ray's own off
    (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, see `constants.RAY_TRAIN_DEFAULTS`) unless the user set it.
    The poll interval is Ray's `RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`.
    """

    def __init__(self):
        self._watcher = None

    def after_worker_group_start(self, worker_group) -> None:
        node_to_ranks: dict[str, list[int]] = {}
        actors = {}
        for w in worker_group.get_workers():
            rank = w.distributed_context.world_rank
            node_to_ranks.setdefault(w.metadata.node_id, []).append(rank)
            actors[rank] = w.actor
        try:
            if self._watcher is None:
                import os

                import ray
                from ray.train.v2._internal.constants import (
                    DEFAULT_PREEMPTION_POLL_INTERVAL_S,
                    PREEMPTION_POLL_INTERVAL_S_ENV_VAR,
                )
                # Ray's knob, read here in the controller as Ray's own callback reads it.
                poll_interval_s = float(os.environ.get(PREEMPTION_POLL_INTERVAL_S_ENV_VAR,
                                                       DEFAULT_PREEMPTION_POLL_INTERVAL_S))
                self._watcher = ray.remote(num_cpus=0, max_restarts=-1)(_preemption_watcher_cls()).remote(
                    node_to_ranks=node_to_ranks, poll_interval_s=poll_interval_s, worker_actors_by_rank=actors)
            else:
                self._watcher.retarget.remote(node_to_ranks, actors)
        except Exception as e:  # training goes on; a drain then ends as a worker failure, from the last checkpoint
            log.warning("openclaw: no preemption notices for this worker group: %s", e)

    def _stand_down(self, *_args) -> None:
        if self._watcher is not None:
            try:
                self._watcher.retarget.remote({}, {})
            except Exception:
                pass

    before_worker_group_shutdown = after_worker_group_abort = _stand_down

    def _stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            import ray
            try:
                ray.kill(watcher)
            except Exception:
                pass

    async def before_controller_shutdown(self) -> None:
        self._stop()

    def before_controller_abort(self) -> None:
        self._stop()
