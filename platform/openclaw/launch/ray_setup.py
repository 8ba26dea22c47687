"""Connecting to Ray and building Ray Train's trainer for a run (driver)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from openclaw import constants
from openclaw.config import FP8_ON_CPU, Config
from openclaw.data.filesystems import ray_storage
from openclaw.errors import ConfigError
from openclaw.launch.capacity import auto_gpu_note, shortfall
from openclaw.runtime.controller_callbacks import FailureBudget, PreemptionNotices, ReportStartFailures, SettleLostNodes
from openclaw.runtime.entry import train_loop
from openclaw.runtime.ray_private import (DatasetsCallback, ElasticScalingPolicy, PlacementGroupCleanerCallback,
                                         state_api_finds_this_cluster)
from openclaw.runtime.scaling import WholeLayoutsPolicy

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The openclaw package folder, shipped to the cluster when it does not have openclaw installed."""


def connect_ray(address: str | None, verbose: bool, config: Config | None = None, min_cpus: int = 0) -> bool:
    """Join `address` (or $RAY_ADDRESS), or start a fresh local instance: true where this call started
    one (no node will join it), false where it joined a cluster or Ray was already connected.

    A local instance gets at least two logical CPUs beyond what the workers reserve: Ray Data's read
    tasks need CPUs of their own, and with every CPU held by a training worker they would never run.
    """
    if ray.is_initialized():
        return False
    if not verbose:  # "Token authentication is enabled..." on every start: expected, not news
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = cluster_address(address)
    kwargs: dict[str, Any] = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                                  configure_logging=True, runtime_env=_runtime_env())
    # Ray's core worker installs its own SIGTERM handler in the driver (it dumps a stack and aborts): the
    # driver's own handler (`launch.stops.stop_signals_raise`), if it has one, is put back after it.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        _check_reachable(address)
        ray.init(address=address, **kwargs)
    else:
        need = min_cpus
        if config is not None:
            need = int(config.scaling.max_workers * config.scaling.resources_per_worker.get("CPU", 1)) + 2
        ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, need), **kwargs)
    if callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)
    return not address


def check_capacity(config: Config, started_here: bool) -> None:
    """Whether the nodes can hold `scaling.min_workers` workers (`launch.capacity`): on an instance that
    `connect_ray` started here a ConfigError, on a cluster a note (nodes may join, and Ray Train waits)."""
    use_gpu, per_worker = worker_resources(config)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    note = auto_gpu_note(config.scaling.use_gpu, use_gpu, may_grow=not started_here)
    if note:
        print(f"openclaw: note: {note}", flush=True)
    missing = shortfall(per_worker, config.scaling.min_workers, nodes, may_grow=not started_here)
    if missing is None:
        return
    if started_here:
        raise ConfigError(missing)
    print(f"openclaw: note: {missing} Ray Train waits for nodes that can.", flush=True)


def worker_resources(config: Config) -> tuple[bool, dict[str, float]]:
    """Whether the workers use GPUs (`scaling.use_gpu`, auto: where the cluster has some), and the
    resources each asks Ray for."""
    s = config.scaling
    use_gpu = _use_gpu(s.use_gpu)
    resources = dict(s.resources_per_worker)
    if use_gpu:
        resources.setdefault("GPU", 1)
    return use_gpu, resources


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS; None for a local instance (unset, or `local`,
    which is no cluster: no node joins it, and its workers need Ray Data's spare CPUs)."""
    address = address or os.environ.get("RAY_ADDRESS")
    return None if not address or address.strip().lower() == "local" else address


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A cluster address (`HOST:PORT`, `ray://HOST:PORT`) must answer: Ray itself retries an address that
    does not for minutes, printing connection warnings."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{address} (`--address` or $RAY_ADDRESS) is a dashboard's address, which `ray job submit` "
                          f"takes: a run joins a cluster at its GCS, HOST:6379 (`ray status` on the head shows it). "
                          f"To run on the cluster, submit it: `ray job submit --address {address} -- python "
                          f"jobs/train.py CONFIG`.")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address, [::1]:6379
    if not host or not port.isdigit():  # "auto", "local": Ray resolves them
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} (`--address` or $RAY_ADDRESS): "
                          f"{e.strerror or e}. Check the address (`ray status` on the head node shows the "
                          f"cluster), start one with `ray start --head`, or leave it unset for a local "
                          f"instance.") from None


def _runtime_env() -> dict[str, Any] | None:
    """Ship the package with the job when the cluster does not have it installed (`jobs/*.py` decide).

    Ray merges this with the runtime env of a `ray job submit`, so the controller, the workers and Ray
    Data's tasks can all import openclaw.
    """
    if os.environ.get(constants.SHIP_PACKAGE_ENV_VAR) != "1":
        return None
    return {"py_modules": [str(PACKAGE_DIR)]}


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Driver-side helper actors live on the driver's node: a worker node may die, the driver's may not."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def build_trainer(config: Config, loop_config: dict[str, Any], storage: str, verbose: bool, progress,
                  callbacks: list | None = None, watch_drains: bool = True) -> TorchTrainer:
    """`watch_drains`: openclaw's one drain watcher for the run, in place of Ray's per-group one (false
    when the user chose with `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`)."""
    s = config.scaling
    use_gpu, resources = worker_resources(config)
    if config.train.precision == "fp8" and not use_gpu:  # `use_gpu: auto` found no GPU: before any worker starts
        raise ConfigError(FP8_ON_CPU)
    num_workers = s.max_workers if s.min_workers == s.max_workers else (s.min_workers, s.max_workers)
    storage_path, storage_fs = ray_storage(storage)
    # The workers stream their shards themselves (`openclaw.data.stream`), in the platform's order: no
    # Ray Data iterator, whose order and position a restart could not recover.
    trainer = OpenclawTorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=s.resize_monitor_interval_s),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=storage_path, storage_filesystem=storage_fs,
            # Unlimited for Ray: openclaw's FailureBudget callback keeps the config's budgets (preemptions apart).
            failure_config=ray.train.FailureConfig(max_failures=-1, max_preemption_failures=-1),
            callbacks=_controller_callbacks(config, progress, watch_drains) + list(callbacks or []),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            worker_runtime_env={"env_vars": constants.forwarded_env()},
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )
    trainer.world_unit = config.parallelism.world_unit
    return trainer


class OpenclawTorchTrainer(TorchTrainer):
    """TorchTrainer without Ray Data's dataset manager, which openclaw has no use for.

    Ray Train starts a `DatasetManager` actor at every worker-group start, datasets or not. openclaw
    passes none (its workers read their shards themselves), so the actor only costs a process start
    and a `ray.data` import, on the CPUs the new workers are starting on: about 1 s of a 6 s restart
    on 2 cores. Without the callback, `ray.train.get_dataset_shard` is unavailable, which openclaw does
    not call.

    On a Ray instance that `ray.init()` started (the local default), it also leaves out Ray's
    placement-group cleaner, which cannot work there and cost 12 s at the end of every run. The cleaner
    asks the state API whether the controller lives, and the state API looks for its cluster in the
    address file of the last `ray start` on the machine, not at this instance. With no such file it gets no
    answer and retries every second; with a stale one (a cluster since killed) each question hangs, so the
    controller's shutdown waits out its 12 s stop timeout; with the file of another live cluster it would
    find no such controller and remove this run's placement group. Such an instance shuts down with the
    process that started it, placement groups included: the leak the cleaner guards against.

    Where a whole layout spans several workers (`parallelism.world_unit`: tensor, pipeline or HSDP), an
    elastic run's controller gets `runtime.scaling.WholeLayoutsPolicy` in place of Ray's elastic policy,
    which would start any worker count that fits; the trainer builds that policy with no public way to
    choose another.

    Ray Train's Ctrl-C handler, which aborts the run at the first Ctrl-C and loses the steps since the
    last checkpoint, is not installed: the session's handler checkpoints first (`launch.session`), and
    aborts the run through `abort` at a second Ctrl-C.
    """

    _controller = None
    world_unit = 1
    """Workers of one whole layout (`parallelism.world_unit`): above 1, an elastic run's worker counts are
    rounded down to its multiples (`runtime.scaling.WholeLayoutsPolicy`)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("scaling_policy")
        if self.world_unit > 1 and isinstance(policy, ElasticScalingPolicy):
            controller_init_kwargs["scaling_policy"] = WholeLayoutsPolicy(self.scaling_config, self.world_unit)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:
        self._controller = controller

    def abort(self) -> None:
        """Abort Ray Train's run now, as Ray's own Ctrl-C handler would (without waiting for it)."""
        if self._controller is not None:
            self._controller.abort.remote()

    def _create_default_callbacks(self):
        unused = () if self.datasets else (DatasetsCallback,)
        if not state_api_finds_this_cluster():
            unused += (PlacementGroupCleanerCallback,)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]


def _controller_callbacks(config: Config, progress, watch_drains: bool) -> list:
    f = config.failure
    callbacks = [ReportStartFailures(progress), FailureBudget(f.max_failures, f.max_preemptions, f.max_same_error,
                                                              progress)]
    if watch_drains:
        callbacks.append(PreemptionNotices())
    if config.scaling.min_workers < config.scaling.max_workers:
        callbacks.append(SettleLostNodes(constants.node_death_wait_s()))
    return callbacks


def _use_gpu(setting: bool | str) -> bool:
    if setting != "auto":
        return bool(setting)
    return ray.cluster_resources().get("GPU", 0) > 0
