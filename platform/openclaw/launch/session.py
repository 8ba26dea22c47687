"""One training job on the driver, from its checks to its end (driver process).

`train` reads like torchtitan's `train.py`: open the session, fit, and close it on every path, with the
status the run ended in. The session is what the driver holds for a job: its MLflow run, the tracking
service and control plane (Ray actors on this node), the progress printer, the node watcher and the
prepared data. `RunSession.close(status)` is the one place a run ends: it stops the helpers, delivers
the tracking ops (or spools them when the server is away) and closes the MLflow run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient
from ray.util.queue import Queue

from openclaw import constants
from openclaw.advice.report import advise_at_end
from openclaw.config import Config
from openclaw.data.filesystems import storage_exists, storage_uri
from openclaw.data.sources import Source
from openclaw.data.stream import shard_specs
from openclaw.errors import ConfigError, OpenClawError, RunStopped, Terminated
from openclaw.launch.console import ProgressPrinter
from openclaw.launch.ending import ending_not_taken, flush_tracking, spool_path
from openclaw.launch.node_watcher import NodeWatcher, pin_coordinator
from openclaw.launch.places import place
from openclaw.launch.preflight import preflight, prepare_data, storage_path, tracking_uri
from openclaw.launch.ray_setup import build_trainer, check_capacity, connect_ray, on_this_node
from openclaw.launch.resume_check import changes_since_checkpoint
from openclaw.launch.stops import graceful_stops, put_back, stop_signals_raise
from openclaw.runtime.control import start_control, wait_for_checkpoint
from openclaw.runtime.inputs import LoopInputs
from openclaw.tracking.lineage import log_lineage
from openclaw.tracking.redact import public_uri, redacted, scrub
from openclaw.tracking.model import log_final_model
from openclaw.tracking.job_file import job_record, record_finished
from openclaw.tracking.run import open_run
from openclaw.tracking.service import start_service
from openclaw.tracking.spool import append_ops, holds_ops

log = logging.getLogger("openclaw")


@dataclass
class TrainResult:
    run_id: str
    checkpoint: str | None
    """Path (or URI) of the final checkpoint."""
    metrics: dict[str, Any]
    experiment_id: str
    tracking_uri: str


def train(config: Config, *, address: str | None = None, verbose: bool = False, callbacks: list | None = None,
          sources: dict[str, Source] | None = None) -> TrainResult:
    """Run one training job to the end and return its run id, final checkpoint and metrics.

    A sweep's trial passes `callbacks` (more Ray Train controller callbacks: Tune's report callback);
    the CLI passes the `sources` its preflight already checked."""
    session = RunSession(place(config), verbose=verbose)
    config = session.config
    if (done := _already_finished(config, session.storage, session.uri)) is not None:
        return done
    try:
        session.open(address, sources)
        result = session.fit(callbacks)
    except BaseException as e:
        session.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise _unwrap(e) from None
    checkpoint = storage_uri(session.storage, result.checkpoint.path) if result.checkpoint else None
    metrics = dict(result.metrics or {})
    stopped_at = metrics.get("step", config.train.max_steps)
    if stopped_at < config.train.max_steps:  # the workers checkpointed and returned on a stop request
        session.close("KILLED")
        raise RunStopped(f"stopped at step {stopped_at} of {config.train.max_steps} on request; checkpoint "
                         f"{checkpoint} is kept. Run the same command again to resume from step {stopped_at}.",
                         signal_name="SIGINT" if session.stopped_by == "Ctrl-C" else "SIGTERM")
    session.close("FINISHED", checkpoint, metrics)
    return TrainResult(session.run_id, checkpoint, metrics, session.experiment_id, public_uri(session.uri))


def _already_finished(config: Config, storage: str, uri: str) -> TrainResult | None:
    """The result of a job whose record says it reached `train.max_steps` (the same command run again),
    with nothing started; None for any other."""
    job = job_record(config, storage)
    done = job.get("finished")
    if not done or done["step"] < config.train.max_steps:
        return None
    print(f"openclaw: {config.name!r} already finished at step {done['step']} (MLflow run {job.get('mlflow_run_id')}); "
          f"nothing to train. Raise `train.max_steps` to train on from its checkpoint, or set another `name` for a "
          f"new run.", flush=True)
    if done["checkpoint"] and not storage_exists(done["checkpoint"]):
        kept = f" the MLflow run keeps the final model (`openclaw export {job['mlflow_run_id']}`)" \
            if job.get("mlflow_run_id") else " no copy of the final model is kept elsewhere (`tracking.enabled` was off)"
        print(f"openclaw: its final checkpoint, {done['checkpoint']}, is no longer there;{kept}.", flush=True)
    return TrainResult(job.get("mlflow_run_id", ""), done["checkpoint"], done["metrics"], job.get("experiment_id", ""),
                       public_uri(uri))


class RunSession:
    def __init__(self, config: Config, *, verbose: bool = False):
        self.config, self.verbose, self.job_start = config, verbose, time.time()
        self.uri, self.storage = tracking_uri(config), storage_path(config)
        self.run_dir = f"{self.storage.rstrip('/')}/{config.name}"
        self.tracked = config.tracking.enabled
        self.run_id = self.experiment_id = ""
        self.prepared: dict[str, Any] = {}
        self.cache = self.progress = self.printer = self.control = self.tracking = self.watcher = None
        self._closed = False
        self._sigterm_before: dict[int, Any] = {}
        """The SIGTERM handler before the run opened, put back when it closes (empty: not replaced)."""
        self.stopped_by: str | None = None
        """What asked the run to stop, if anything did: "SIGTERM" or "Ctrl-C" (the driver's signal handlers)."""

    def open(self, address: str | None, sources: dict[str, Source] | None = None) -> None:
        """Check (unless `sources` were), connect, prepare the data, open the MLflow run, start the helpers."""
        config = self.config
        sources = sources or preflight(config)  # before anything starts
        resuming = changes_since_checkpoint(config, self.run_dir)  # the model, task and optimizer it must keep
        if self.tracked:
            self._refuse_an_unsent_spool()
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # openclaw prints its own UI link
        self._sigterm_before = stop_signals_raise()  # `connect_ray` keeps it in place of Ray's own
        check_capacity(config, started_here=connect_ray(address, self.verbose, config))
        self.prepared, self.cache = prepare_data(config, sources, self.storage)  # a bad shard stops the job here
        resumed = False
        if self.tracked:
            self.run_id, self.experiment_id, resumed = open_run(config, self.uri, self.storage)
        print(f"openclaw: {'resuming' if resumed else 'starting'} {config.name!r}; " +
              (f"MLflow run {self.run_id} ({public_uri(self.uri)})" if self.tracked else
               "tracking off (`tracking.enabled: false`)"), flush=True)
        if resuming and resuming[1]:
            self._note_changes(*resuming)
        if self.tracked:
            try:
                log_lineage(self.uri, self.run_id, self.prepared, resumed)
            except Exception as e:  # lineage must not cost the run
                log.warning("could not record the datasets in MLflow run %s: %s", self.run_id, e)
        self.progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
        self.printer = ProgressPrinter(self.progress)
        self.printer.start()
        self.control = start_control(config.name, on_this_node())
        if self.tracked:
            self.tracking = start_service(self.uri, self.run_id, self.progress, spool_path(self.run_dir, self.run_id),
                                          on_this_node(), constants.secret_env())
        if config.scaling.min_workers < config.scaling.max_workers:
            pin_coordinator()
            self.watcher = NodeWatcher(
                constants.node_watch_interval_s(), on_change=lambda msg: self.progress.put_nowait({"message": msg}),
                before_grow=lambda: wait_for_checkpoint(self.control, constants.checkpoint_before_grow_s()))
            self.watcher.start()

    def _refuse_an_unsent_spool(self) -> None:
        """An earlier session's spool for this run must be uploaded first: its ops (a restore, an end)
        applied after this session's dropped the metrics in between and set a finished run back to KILLED."""
        run_id = job_record(self.config, self.storage).get("mlflow_run_id")
        spool = spool_path(self.run_dir, run_id) if run_id else None
        if spool and os.path.exists(spool) and holds_ops(spool):
            raise ConfigError(f"run {self.config.name!r} has tracking updates an earlier session could not deliver, "
                              f"in {spool}: upload them first (`openclaw sync-spool {spool}`), then run this "
                              f"command again.")

    def _note_changes(self, checkpoint: str, changes: dict[str, tuple[Any, Any]]) -> None:
        """Say what the config changes since the checkpoint the run resumes from, and keep it in the run
        (`config_changes/<time>.json`): its params keep the values it started with."""
        said = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())
        print(f"openclaw: the config changed since {checkpoint}: {said}", flush=True)
        if self.tracked:
            with contextlib.suppress(Exception):  # a record, not a reason to stop the run
                MlflowClient(self.uri).log_dict(self.run_id, {"checkpoint": checkpoint, "changes": {
                    k: {"before": v[0], "after": v[1]} for k, v in changes.items()}},
                    f"config_changes/{time.strftime('%Y%m%d-%H%M%S')}.json")

    def fit(self, callbacks: list | None = None):
        """Ray Train's run of the workers, to its end; returns Ray's `Result`."""
        inputs = LoopInputs(config=self.config.resolved(), run_id=self.run_id, run_dir=self.run_dir,
                            secrets=constants.secret_env(),
                            data={k: {"spec": p.source.spec, "shards": shard_specs(p.source.shards)}
                                  for k, p in self.prepared.items()},
                            tracking=self.tracking, control=self.control, progress=self.progress,
                            job_start_time=self.job_start)
        with graceful_stops(self.control) as stops, \
                constants.ray_train_env(self.config.failure.worker_start_timeout_s) as env:
            trainer = build_trainer(self.config, {"inputs": inputs}, self.storage, self.verbose, self.progress,
                                    callbacks, watch_drains=constants.PREEMPTION_WATCHER_ENV_VAR in env)
            stops.abort = trainer.abort
            try:
                result = trainer.fit()
            except KeyboardInterrupt:  # Ray Train raises its own for a stop at once, whatever the signal
                raise Terminated if stops.at_once == signal.SIGTERM else KeyboardInterrupt from None
        self.stopped_by = stops.cause
        return result

    def close(self, status: str, checkpoint: str | None = None, metrics: dict[str, Any] | None = None) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED): stop the helpers, deliver the tracking
        ops, and close the MLflow run, which with FINISHED first gets the model of `checkpoint`. Where the
        tracking server is away, the ending goes to the spool and `openclaw sync-spool` carries it out."""
        if self._closed:
            return
        self._closed = True
        put_back(self._sigterm_before)
        if self.watcher:
            self.watcher.stop()
        spool = flush_tracking(self.tracking, self.uri, self.config.tracking.flush_timeout_s) if self.tracking else None
        if self.printer:
            self.printer.stop()
        for p in self.prepared.values() if self.cache else ():  # the prepared data may be evicted again
            self.cache.release(p.cache_key)
        if status == "FINISHED":
            record_finished(self.config, self.storage, (metrics or {}).get("step", self.config.train.max_steps),
                            checkpoint, metrics or {})
            advise_at_end(self.config, metrics or {}, uri=self.uri, run_id=None if spool else self.run_id,
                          prepared=self.prepared, wall_s=time.time() - self.job_start)  # printed, logged; never raises
        if not self.run_id:
            return
        if spool:
            self._spool_ending(spool, status, checkpoint)
        else:
            self._end_mlflow_run(status, checkpoint)

    def _spool_ending(self, spool: str, status: str, checkpoint: str | None) -> None:
        if status != "FINISHED":
            append_ops(spool, self.uri, self.run_id, [("end", (status,))])  # (its `run` line where it has none)
            return
        append_ops(spool, self.uri, self.run_id, [("finish", (redacted(self.config.resolved()), checkpoint))])
        print(f"openclaw: the final model is in {checkpoint}; `openclaw sync-spool {spool}` also logs it to "
              f"MLflow and closes the run.", file=sys.stderr, flush=True)

    def _end_mlflow_run(self, status: str, checkpoint: str | None) -> None:
        client = MlflowClient(self.uri)
        if status != "FINISHED":
            try:
                if client.get_run(self.run_id).info.status == "RUNNING":  # a sweep may have marked it
                    client.set_terminated(self.run_id, status=status)
            except Exception as e:  # the run's own error matters more: said, not raised
                ending_not_taken(self.run_dir, self.uri, self.run_id, status, e)
            return
        try:
            if checkpoint:
                log_final_model(self.config, self.uri, self.run_id, checkpoint,
                                {k: p.source for k, p in self.prepared.items()})
            client.set_terminated(self.run_id, status="FINISHED")
        except Exception as e:  # the server went away after the flush: the ending waits in the spool
            spool = spool_path(self.run_dir, self.run_id)
            append_ops(spool, self.uri, self.run_id, [("finish", (redacted(self.config.resolved()), checkpoint))])
            print(scrub(f"openclaw: could not log the final model or close MLflow run {self.run_id} at {self.uri} ({e}); "
                        f"the trained model is in {checkpoint}, and `openclaw sync-spool {spool}` logs it and "
                        f"closes the run."), file=sys.stderr, flush=True)


def _unwrap(error: BaseException) -> BaseException:
    """Surface an openclaw error raised in a worker as itself, not wrapped in Ray's TrainingFailedError."""
    seen = error
    for _ in range(5):
        if isinstance(seen, OpenClawError):
            return seen
        inner = getattr(seen, "worker_failures", None) or {}
        nested = next(iter(inner.values()), None) if isinstance(inner, dict) else None
        seen = nested or getattr(seen, "controller_failure", None) or seen.__cause__
        if seen is None:
            break
    return error
