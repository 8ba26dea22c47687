"""Driver side: validate everything, open the MLflow run, connect to Ray, build the Train V2
`TorchTrainer`, stream progress lines, and log the final model. Worker code is in `openclaw.runtime.loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from openclaw import constants
from openclaw.config import Config
from openclaw.data.sources import Source, check_columns, resolve
from openclaw.data.prep import Prepared, check_transforms, prepare
from openclaw.data.stream import shard_specs
from openclaw.errors import ConfigError, DataError, OpenClawError, RunStopped
from openclaw.engine.models import build_model, import_path
from openclaw.tracking.run import log_final_model, open_run, record_finished
from openclaw.tracking.progress import format_progress
from openclaw.tracking.service import append_to_spool, start_service

log = logging.getLogger("openclaw")


@dataclass
class TrainResult:
    run_id: str
    checkpoint: str | None
    """Path (or URI) of the final checkpoint."""
    metrics: dict[str, Any]
    experiment_id: str
    tracking_uri: str


# ---- before any worker starts ----------------------------------------------------------------------

def preflight(config: Config) -> dict[str, Source]:
    """Check data paths, columns, transforms and import paths; raise a `UserError` naming what to fix."""
    d = config.data
    sources = {"train": resolve(d.train, "data.train", d.s3, d.on_bad_shard)}
    if d.val:
        sources["val"] = resolve(d.val, "data.val", d.s3, d.on_bad_shard)
    for source in sources.values():
        schema = check_transforms(source, config) if d.transforms else source.schema
        check_columns(dataclasses.replace(source, schema=schema), d.features, d.label)
    if config.task != "language_modeling" and d.label is None and ":" not in config.task:
        raise ConfigError("`data.label` is unset but `task` is classification; set `data.label` to the target column.")
    if ":" in config.task:
        import_path(config.task, "task")
    build_model(config.model.name, config.model.kwargs)  # imports a user's model and checks its kwargs
    if config.train.record_samples and "://" in config.checkpoint.storage:
        raise ConfigError("`train.record_samples` writes next to the checkpoints and needs a local "
                          "`checkpoint.storage`; turn it off or use a local folder.")
    check_rows(sources["train"], config)
    return sources


def check_rows(train: Source, config: Config) -> None:
    if train.num_rows < config.train.global_batch_size:
        raise DataError(f"`data.train` has {train.num_rows} rows, fewer than one global batch "
                        f"(`train.global_batch_size` = {config.train.global_batch_size}). Lower the batch size.")


def tracking_uri(config: Config) -> str:
    return config.tracking.uri or constants.default_tracking_uri()


def storage_path(config: Config) -> str:
    s = config.checkpoint.storage
    return s if "://" in s else os.path.abspath(os.path.expanduser(s))


# ---- Ray ------------------------------------------------------------------------------------------

def connect_ray(address: str | None, verbose: bool, config: Config | None = None, min_cpus: int = 0) -> None:
    """Join `address` (or $RAY_ADDRESS), or start a fresh local instance.

    A local instance gets at least two logical CPUs beyond what the workers reserve: Ray Data's read
    tasks need CPUs of their own, and with every CPU held by a training worker they would never run.
    """
    import ray
    if ray.is_initialized():
        return
    if not verbose:  # "Token authentication is enabled..." on every start: expected, not news
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                                  configure_logging=True, runtime_env=_runtime_env())
    if address:
        ray.init(address=address, **kwargs)
    else:
        need = min_cpus
        if config is not None:
            need = int(config.scaling.max_workers * config.scaling.resources_per_worker.get("CPU", 1)) + 2
        ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, need), **kwargs)


def _runtime_env() -> dict[str, Any] | None:
    """Ship the package with the job when the cluster does not have it installed (`jobs/*.py` decide).

    Ray merges this with the runtime env of a `ray job submit`, so the controller, the workers and Ray
    Data's tasks can all import openclaw.
    """
    if os.environ.get(constants.SHIP_PACKAGE_ENV_VAR) != "1":
        return None
    import openclaw
    return {"py_modules": [os.path.dirname(openclaw.__file__)]}


def build_trainer(config: Config, loop_config: dict[str, Any], storage: str, verbose: bool,
                  callbacks: list | None = None, watch_drains: bool = True):
    """`watch_drains`: openclaw's one drain watcher for the run, in place of Ray's per-group one (false
    when the user chose with `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from openclaw.runtime.loop import train_loop

    s = config.scaling
    use_gpu = _use_gpu(s.use_gpu)
    num_workers = s.max_workers if s.min_workers == s.max_workers else (s.min_workers, s.max_workers)
    resources = dict(s.resources_per_worker)
    if use_gpu:
        resources.setdefault("GPU", 1)
    # The workers stream their shards themselves (`openclaw.data.stream`), in the platform's order: no
    # Ray Data iterator, whose order and position a restart could not recover.
    return _trainer_cls(TorchTrainer)(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=s.resize_monitor_interval_s),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.failure.max_failures),
            callbacks=_controller_callbacks(config, loop_config["progress"], watch_drains) + list(callbacks or []),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            worker_runtime_env={"env_vars": constants.forwarded_env()},
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )


def _trainer_cls(torch_trainer: type) -> type:
    """TorchTrainer without Ray Data's dataset manager, which openclaw has no use for.

    Ray Train starts a `DatasetManager` actor at every worker-group start, datasets or not. openclaw
    passes none (its workers read their shards themselves), so the actor only costs a process start
    and a `ray.data` import, on the CPUs the new workers are starting on: about 1 s of a 6 s restart
    on 2 cores. Without the callback, `ray.train.get_dataset_shard` is unavailable, which openclaw does
    not call.
    """
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:  # another Ray layout: keep Ray's callbacks as they are
        return torch_trainer

    class OpenclawTorchTrainer(torch_trainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return OpenclawTorchTrainer


def _controller_callbacks(config: Config, progress, watch_drains: bool) -> list:
    from openclaw.runtime.controller_callbacks import PreemptionNotices, ReportStartFailures, SettleLostNodes
    callbacks = [ReportStartFailures(progress)]
    if watch_drains:
        callbacks.append(PreemptionNotices())
    if config.scaling.min_workers < config.scaling.max_workers:
        callbacks.append(SettleLostNodes(constants.node_death_wait_s()))
    return callbacks


def prepare_data(config: Config, sources: dict[str, Source], storage: str) -> tuple[dict[str, Prepared], Any]:
    """Prepare (or find in the cache) what training reads, and say so."""
    prepared, cache = prepare(sources, config, storage)
    for name, p in prepared.items():
        if p.cache != "off":
            how = ("found in the cache" if p.cache == "hit" else f"prepared in {p.prepare_s:.1f} s")
            print(f"openclaw: data.{name}: {p.source.num_rows} rows in {len(p.source.shards)} shard(s), {how} "
                  f"({p.source.spec})", flush=True)
        if p.source.skipped:
            print(f"openclaw: data.{name}: skipped {len(p.source.skipped)} bad shard(s) (`data.on_bad_shard: skip`): "
                  + "; ".join(why for _, why in p.source.skipped), file=sys.stderr, flush=True)
    check_rows(prepared["train"].source, config)
    return prepared, cache


def _use_gpu(setting: bool | str) -> bool:
    if setting != "auto":
        return bool(setting)
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


# ---- progress lines --------------------------------------------------------------------------------

class _ProgressPrinter(threading.Thread):
    def __init__(self, queue, out=None):
        super().__init__(daemon=True, name="openclaw-progress")
        self.queue, self.out, self._stop_event = queue, out or sys.stdout, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.drain(timeout=0.5)

    def drain(self, timeout: float | None = None) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize()) if timeout is None else [
                self.queue.get(timeout=timeout)]
        except Exception:
            return
        for item in items:
            print(format_progress(item), file=self.out, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.drain()


# ---- the whole job ---------------------------------------------------------------------------------

def train(config: Config, *, address: str | None = None, verbose: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Run one training job to the end and return its run id, final checkpoint and metrics.

    A sweep's trial passes `callbacks` (more Ray Train controller callbacks: Tune's report callback)."""
    import time

    from ray.util.queue import Queue

    job_start = time.time()
    sources = preflight(config)
    uri, storage = tracking_uri(config), storage_path(config)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # openclaw prints its own UI link
    tracked = config.tracking.enabled
    connect_ray(address, verbose, config)
    prepared, cache = prepare_data(config, sources, storage)  # a bad shard stops the job here, before its run
    run_id, exp_id, resumed = open_run(config, uri, storage) if tracked else ("", "", False)
    print(f"openclaw: {'resuming' if resumed else 'starting'} {config.name!r}; " +
          (f"MLflow run {run_id} ({uri})" if tracked else "tracking off (`tracking.enabled: false`)"), flush=True)
    if tracked:
        try:
            from openclaw.tracking.lineage import log_lineage
            log_lineage(uri, run_id, prepared)
        except Exception as e:  # lineage must not cost the run
            log.warning("could not record the datasets in MLflow run %s: %s", run_id, e)
    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": _on_this_node()})
    printer = _ProgressPrinter(progress)
    printer.start()
    run_dir = f"{storage.rstrip('/')}/{config.name}"
    tracking = start_service(uri, run_id, progress, _spool_path(run_dir, run_id), _on_this_node(), config.name)
    watcher = None
    if config.scaling.min_workers < config.scaling.max_workers:
        from openclaw.runtime.controller_callbacks import NodeWatcher, pin_coordinator
        pin_coordinator()
        watcher = NodeWatcher(constants.node_watch_interval_s(),
                              on_change=lambda msg: progress.put_nowait({"message": msg}),
                              before_grow=lambda: _checkpoint_now(tracking, constants.checkpoint_before_grow_s()))
        watcher.start()
    loop_config = {"config": config.resolved(), "run_id": run_id, "tracking": tracking, "progress": progress,
                   "run_dir": run_dir, "job_start_time": job_start,
                   "data": {k: {"spec": p.source.spec, "shards": shard_specs(p.source.shards)}
                            for k, p in prepared.items()}}
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    try:
        with _graceful_sigterm(tracking), constants.ray_train_env(config.failure.worker_start_timeout_s) as env:
            result = build_trainer(config, loop_config, storage, verbose, callbacks,
                                   watch_drains=constants.PREEMPTION_WATCHER_ENV_VAR in env).fit()
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        spool = _flush_tracking(tracking, uri, config.tracking.flush_timeout_s)
        if spool:  # the server is away: `sync-spool` closes the run
            append_to_spool(spool, "end", status)
        with contextlib.suppress(Exception):  # the error below matters more
            if tracked and not spool and client.get_run(run_id).info.status == "RUNNING":  # a sweep may have marked it
                client.set_terminated(run_id, status=status)
        raise _unwrap(e) from None
    finally:
        if watcher:
            watcher.stop()
        printer.stop()
        if cache:  # the prepared data may be evicted again
            for p in prepared.values():
                cache.release(p.cache_key)
    spool = _flush_tracking(tracking, uri, config.tracking.flush_timeout_s)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    stopped_at = (result.metrics or {}).get("step", config.train.max_steps)
    if stopped_at < config.train.max_steps:  # the workers checkpointed and returned on a stop request
        if spool:
            append_to_spool(spool, "end", "KILLED")
        with contextlib.suppress(Exception):
            if tracked and not spool:
                client.set_terminated(run_id, status="KILLED")
        raise RunStopped(f"stopped at step {stopped_at} of {config.train.max_steps} on request; checkpoint "
                         f"{checkpoint} is kept. Run the same command again to resume from step {stopped_at}.")
    record_finished(config, storage, stopped_at, checkpoint, dict(result.metrics or {}))
    if spool:  # the server is away: `sync-spool` logs the model and closes the run, instead of waiting here
        append_to_spool(spool, "finish", config.resolved(), checkpoint)
        print(f"openclaw: the final model is in {checkpoint}; `openclaw sync-spool {spool}` also logs it to "
              f"MLflow and closes the run.", file=sys.stderr, flush=True)
        return TrainResult(run_id, checkpoint, dict(result.metrics or {}), exp_id, uri)
    try:
        if checkpoint and tracked:
            log_final_model(config, run_id, result.checkpoint, {k: p.source for k, p in prepared.items()})
        if tracked:
            client.set_terminated(run_id, status="FINISHED")
    except Exception as e:  # the server is away: training is done and its checkpoint is safe
        print(f"openclaw: could not log the final model or close MLflow run {run_id} at {uri} ({e}); the "
              f"trained model is in {checkpoint}.", file=sys.stderr, flush=True)
    return TrainResult(run_id, checkpoint, dict(result.metrics or {}), exp_id, uri)


@contextlib.contextmanager
def _graceful_sigterm(tracking):
    """While training: the first SIGTERM asks the workers to checkpoint at their next step and return
    (a second one stops at once, as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
        tracking.request_stop.remote("SIGTERM")
        print("openclaw: SIGTERM: checkpointing at the next step, then stopping (send it again to stop at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checkpoint_now(tracking, timeout_s: float) -> bool:
    """Ask the workers for a checkpoint at their next step and wait (at most `timeout_s`) until it is saved."""
    import time

    import ray
    request = ray.get(tracking.request_checkpoint.remote())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(tracking.checkpoint_request_done.remote(request)):
            return True
        time.sleep(0.1)
    return False


def _spool_path(run_dir: str, run_id: str) -> str:
    """Where undelivered tracking ops are kept: the run's folder when it is local, else the working folder."""
    folder = run_dir if "://" not in run_dir else os.getcwd()
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"tracking-spool-{run_id}.jsonl")


def _flush_tracking(tracking, uri: str, timeout_s: float) -> str | None:
    """Wait for the tracking service to deliver everything. If the server stays away, say where it is
    kept and return that spool file's path."""
    import ray
    try:
        outcome = ray.get(tracking.flush.remote(timeout_s))
    except Exception as e:  # the service is gone with its queue: nothing more can be done here
        log.warning("the tracking service failed: %s", e)
        return None
    if outcome["delivered"]:
        return None
    print(f"openclaw: MLflow at {uri} did not answer; {outcome['ops']} tracking update(s) are kept in "
          f"{outcome['spool']}. Upload them when it is back: openclaw sync-spool {outcome['spool']}",
          file=sys.stderr, flush=True)
    return outcome["spool"]


def _on_this_node():
    """Driver-side helper actors live on the driver's node: a worker node may die, the driver's may not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _unwrap(error: BaseException) -> BaseException:
    """Surface an openclaw error raised in a worker as itself, not wrapped in Ray's TrainingFailedError."""
    seen = error
    for _ in range(5):
        if isinstance(seen, OpenClawError):
            return seen
        inner = getattr(seen, "worker_failures", None) or {}
        nested = next(iter(inner.values()), None) if isinstance(inner, dict) else None
        seen = nested or seen.__cause__
        if seen is None:
            break
    return error
