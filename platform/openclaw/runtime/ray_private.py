"""Every import of a private Ray module in openclaw, each with its reason (imported by the driver, Ray
Train's controller and the workers).

openclaw pins Ray to 2.60.x (`pyproject.toml`). These names are not Ray's public API, so a Ray upgrade
may move them: this module then fails at import, naming what moved, instead of a fallback silently
changing what openclaw does. Nothing else in openclaw imports `ray.*._internal` (a test enforces it).
"""
from __future__ import annotations

import ray

try:
    # Base classes of Ray Train V2's controller and worker-group callbacks (`ray.train.RunConfig(callbacks=)`
    # accepts them; Ray 2.60 exports no public name for them). openclaw's callbacks settle lost nodes
    # before a restart, report failed worker-group starts, and run one drain watcher per run.
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    # The callback through which Ray Train starts a Ray Data `DatasetManager` actor at every worker-group
    # start, datasets or not. openclaw passes no datasets (its workers stream their own shards) and leaves
    # it out: about 1 s of a restart on 2 cores.
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    # Ray Train's node-drain watcher, and its poll-interval knob. Ray starts one per worker group (a new
    # actor process at every restart); openclaw runs this class in the controller's process, once per run,
    # and re-aims it.
    from ray.train.v2._internal.execution.preemption import PreemptionWatcher
    from ray.train.v2._internal.constants import (
        DEFAULT_PREEMPTION_POLL_INTERVAL_S,
        PREEMPTION_POLL_INTERVAL_S_ENV_VAR,
    )

    # Ray Train's callback that starts a detached `PlacementGroupCleaner` actor for every run. The cleaner
    # asks Ray's state API, every second, whether the controller still lives, and removes the run's
    # placement group when it does not. openclaw leaves it out where the state API cannot find this cluster
    # (`launch.ray_setup.OpenclawTorchTrainer` says why).
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    # The address file that `ray start` writes on each node of its cluster: where Ray's state API looks
    # for a cluster when nothing names one (no public name reads it).
    from ray._private.utils import read_ray_address

    # The worker's train context, whose preemption context holds the latest drain notice. The public
    # `ray.train.get_preemption_info()` reads it too, but raises outside a Ray Train worker; the stop
    # signals poll it every step and want None instead.
    from ray.train.v2._internal.execution.context import get_train_context

    # Ray Data's cluster autoscaling coordinator: Ray Train V2's elastic policy sizes a restarted worker
    # group from the resources it holds, which it re-reads only every 20 s. openclaw asks it to recompute
    # when a node joins or dies, and creates it on the driver's node (see `launch.node_watcher`).
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    # Ray Train V2's elastic scaling policy, which starts or resizes a worker group to as many workers as the
    # cluster fits, any count from min to max (the trainer builds it with no public way to choose another).
    # openclaw rounds that count down to whole layouts of replicate x tensor x pipeline workers
    # (`runtime.scaling`), so that an elastic run with model parallelism never starts a world it cannot lay out.
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    # The file in which Ray Train's checkpoint manager records the checkpoints it tracks (and will delete
    # itself, failing the run if one is already gone). openclaw reads it so that its own pruning of
    # checkpoints Ray never registered leaves every one Ray knows alone.
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
except ImportError as e:  # pragma: no cover - only on a Ray other than 2.60
    raise ImportError(f"openclaw needs Ray 2.60's internal layout, and Ray {ray.__version__} moved {e.name or e}. "
                      f"Install ray==2.60.* (pyproject.toml pins it).") from e


def state_api_finds_this_cluster() -> bool:
    """Whether Ray's state API, asked on this node with no address, reaches the cluster this process is
    connected to: true on every node of a `ray start` cluster, false on an instance `ray.init()` started
    (no address file, or the stale one of an earlier `ray start`)."""
    return read_ray_address() == ray.get_runtime_context().gcs_address


__all__ = ["ControllerCallback", "WorkerGroupCallback", "DatasetsCallback", "PlacementGroupCleanerCallback",
           "state_api_finds_this_cluster", "PreemptionWatcher",
           "DEFAULT_PREEMPTION_POLL_INTERVAL_S", "PREEMPTION_POLL_INTERVAL_S_ENV_VAR", "get_train_context",
           "get_or_create_autoscaling_coordinator", "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME", "ElasticScalingPolicy"]
