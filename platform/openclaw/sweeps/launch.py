"""`openclaw sweep CONFIG`: a Ray Tune search over whole openclaw training jobs (driver).

One MLflow parent run per sweep holds the search space, the best trial so far (its run, metric and
config, updated as trials finish) and a table of every trial (`sweep.parent_run`). Each trial is a
child run (`sweep.trial`). ASHA's early stops are graceful (the trial checkpoints and returns) and recorded as
such on the child run, not as failures. A sweep whose driver died, or that Ctrl-C or SIGTERM stopped
(`sweeps.interrupt`), resumes with `--resume`: Tune keeps finished trials finished, and unfinished ones
resume their own checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from openclaw import constants
from openclaw.config import Config, validate
from openclaw.errors import ConfigError, RunStopped
from openclaw.launch.places import place
from openclaw.launch.preflight import prepare_data, preflight, storage_path, tracking_uri
from openclaw.launch.ray_setup import connect_ray
from openclaw.launch.stops import put_back, stop_signals_raise
from openclaw.sweeps.checks import check_sweep, check_value_ranges_in_space
from openclaw.sweeps.config import SweepConfig, grid_size
from openclaw.sweeps.interrupt import graceful_interrupt
from openclaw.sweeps.parent_run import FAILED, FINISHED, SweepTracker, ended_outcome, remember_uri
from openclaw.sweeps.saved_state import check_same_sweep, check_saved_state, keep_sweep_section
from openclaw.sweeps.search import scheduler, search_alg, tune_space
from openclaw.sweeps.trial import run_trial
from openclaw.tracking.redact import public_uri
from openclaw.tracking.run import open_run
SWEEP_STATE_SAVE_S = "2"
"""Tune saves its experiment state (which trials finished) at most this often (its default is 10 s or
more), so that a driver killed right after a trial finished does not run it again on `--resume`."""


@dataclass
class SweepResult:
    parent_run_id: str
    best_trial: str | None
    best_run_id: str | None
    best_metric: float | None
    best_params: dict[str, Any]
    trials: list[dict[str, Any]]
    experiment_id: str
    tracking_uri: str


def sweep(config: Config, *, resume: bool = False, address: str | None = None, verbose: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the config's sweep to the end."""
    config = place(config)
    s = check_sweep(config)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # openclaw prints its own UI link
    # the data's files and columns, and the space's model values against the data, before anything starts
    sources = preflight(config, checks=(lambda found: check_value_ranges_in_space(config, s, found),))
    uri, storage = _absolute_store(tracking_uri(config)), storage_path(config)
    exp_path = f"{storage.rstrip('/')}/{config.name}"
    _check_resume(config, storage, exp_path, resume)
    parent_id, exp_id = _open_parent_run(config, s, uri, storage, resume)
    client = MlflowClient(uri)
    sigterm_before = stop_signals_raise()  # until the sweep ends: a SIGTERM stops it, the parent run KILLED
    try:
        per_trial = 1 + config.scaling.max_workers * int(config.scaling.resources_per_worker.get("CPU", 1))
        connect_ray(address, verbose, min_cpus=s.max_concurrent * per_trial + 2)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SWEEP_STATE_SAVE_S)
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # an off-grid checkpoint (SIGTERM) may precede the first log
        base = _absolute_paths(config.resolved(), storage)
        _prepare_once(validate(base), sources, storage)
        tuner = _tuner(config, s, base, storage, uri, exp_id, parent_id, exp_path, resume, verbose)
        # Tune copies the driver's AWS credentials into its trial actors' runtime env; the trials get them
        # as the `secrets` parameter instead.
        with constants.env_without(constants.TUNE_PROPAGATED_SECRETS), \
                constants.env_with({**_tune_output(verbose), "TUNE_DISABLE_SIGINT_HANDLER": "1"}), \
                graceful_interrupt(verbose, lambda: _close_interrupted(client, exp_id, parent_id)) as interrupt:
            grid = tuner.fit()
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(parent_id, status="KILLED")
        raise
    finally:
        put_back(sigterm_before)
    if interrupt.requested:
        _close_interrupted(client, exp_id, parent_id)  # again: a trial may have started after the first time
        done = sum(_row(r, s.metric, config.train.max_steps)["outcome"] == FINISHED for r in grid)
        total = grid_size(s) if s.search == "grid" else s.num_samples
        raise RunStopped(f"sweep {config.name!r} interrupted with {done} of its {total} trial(s) finished; "
                         f"Tune saved its state in {exp_path}. Run the same command with --resume to go on "
                         f"(finished trials are kept, unfinished ones resume from their checkpoints).",
                         signal_name=interrupt.signal_name)
    return _finish(client, grid, s, config.train.max_steps, parent_id, exp_id, uri)


def _tuner(config: Config, s: SweepConfig, base: dict[str, Any], storage: str, uri: str, exp_id: str,
           parent_id: str, exp_path: str, resume: bool, verbose: bool) -> tune.Tuner:
    """Tune's Tuner for the sweep, or with `resume` the one Tune saved."""
    # The trials' credentials travel as a parameter (Ray's object store, in memory), not in a runtime env.
    trainable = tune.with_parameters(run_trial, base=base, sweep_name=config.name, storage=storage,
                                     tracking_uri=uri, parent_run_id=parent_id, secrets=constants.secret_env())
    if resume:
        remember_uri(uri)  # for the saved tracker, which Tune keeps without the URIs' credentials
        remember_uri(storage)
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=tune_space(s),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent if s.search == "optuna" else None,
                                    search_alg=search_alg(s), scheduler=scheduler(s, config)),
        run_config=tune.RunConfig(name=config.name, storage_path=storage, verbose=1 if verbose else 0,
                                  callbacks=[SweepTracker(config, uri, exp_id, parent_id, storage)]))


def _tune_output(verbose: bool) -> dict[str, str]:
    """Without --verbose, Tune's own console output goes: openclaw prints each trial's start and end, and
    the best. Tune's reporter prints its banner (a table, the experiment folder, a TensorBoard command for
    logs openclaw does not keep) whatever the verbosity; its older reporter prints nothing at verbosity 0."""
    if verbose or "RAY_AIR_NEW_OUTPUT" in os.environ:
        return {}
    return {"RAY_AIR_NEW_OUTPUT": "0"}


def _close_interrupted(client: MlflowClient, exp_id: str, parent_id: str) -> None:
    """The parent run and the trials Tune stopped mid-run end KILLED (`--resume` reopens them)."""
    running = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                         f"attributes.status = 'RUNNING'")
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED")


def _check_resume(config: Config, storage: str, exp_path: str, resume: bool) -> None:
    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise ConfigError(f"there is no sweep {config.name!r} to resume in {storage} (no Tune state under "
                          f"{exp_path}). Drop --resume to start it.")
    if exists and not resume:
        raise ConfigError(f"sweep {config.name!r} already exists in {storage}. Pass --resume to continue it "
                          f"(finished trials are kept), or set a new `name` to start another.")
    section = config.resolved()["sweep"]
    if resume:
        check_same_sweep(exp_path, section)
        if moved := check_saved_state(exp_path, config.name):
            print(moved, flush=True)
    else:
        keep_sweep_section(exp_path, section)


def _open_parent_run(config: Config, s: SweepConfig, uri: str, storage: str, resume: bool) -> tuple[str, str]:
    """The sweep's MLflow run (reopened on resume), with its search space; says what the sweep will do."""
    parent_id, exp_id, _ = open_run(config, uri, storage)
    client = MlflowClient(uri)
    client.set_tag(parent_id, "openclaw.kind", "sweep")
    client.log_dict(parent_id, {k: v.model_dump(exclude_none=True) for k, v in s.space.items()}, "sweep_space.json")
    n_trials = grid_size(s) if s.search == "grid" else s.num_samples
    print(f"openclaw: {'resuming' if resume else 'starting'} sweep {config.name!r}: {n_trials} trials, "
          f"{s.max_concurrent} at a time, {s.search} search{', ASHA' if s.scheduler == 'asha' else ''}, "
          f"{s.mode} {s.metric}; MLflow parent run {parent_id} ({public_uri(uri)})", flush=True)
    return parent_id, exp_id


def _finish(client: MlflowClient, grid, s: SweepConfig, max_steps: int, parent_id: str, exp_id: str,
            uri: str) -> SweepResult:
    """Close the parent run (FAILED only if every trial failed) and gather the result from it."""
    trials = [_row(r, s.metric, max_steps) for r in grid]
    failed = [t for t in trials if t["outcome"] == FAILED]
    client.set_terminated(parent_id, status="FAILED" if len(failed) == len(trials) else "FINISHED")
    parent = client.get_run(parent_id).data
    if failed:
        print(f"openclaw: {len(failed)} of {len(trials)} trial(s) failed: {', '.join(str(t['trial']) for t in failed)}",
              file=sys.stderr, flush=True)
    return SweepResult(parent_id, parent.tags.get("best.trial"), parent.tags.get("best.run_id") or None,
                       parent.metrics.get(f"best/{s.metric}"), json.loads(parent.tags.get("best.params", "{}")),
                       trials, exp_id, public_uri(uri))


def _absolute_paths(raw: dict[str, Any], storage: str) -> dict[str, Any]:
    """Local data and cache paths made absolute from the driver's working folder: trials run in Tune's
    trial folders (and a trial's log of its config then says where the data was). All trials share the
    sweep's prepared-data cache (a relative `data.cache.dir` was one per trial folder, prepared again by
    every trial)."""
    for key in ("train", "val"):
        path = raw["data"].get(key)
        if path and "://" not in path:
            raw["data"][key] = os.path.abspath(os.path.expanduser(path))
    for section in ("cache", "shard_cache"):
        folder = raw["data"][section].get("dir")
        if folder and "://" not in folder:
            raw["data"][section]["dir"] = os.path.abspath(os.path.expanduser(folder))
    if not raw["data"]["cache"].get("dir") and "://" not in storage:
        raw["data"]["cache"]["dir"] = os.path.join(storage, ".data-cache")
    return raw


def _absolute_store(uri: str) -> str:
    """A relative `sqlite:///` store made absolute from the driver's working folder: each trial opened
    its run in a store of its own, in its Tune trial folder, and the parent found none of its children."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(os.path.expanduser(uri.removeprefix('sqlite:///')))}"
    return uri


def _prepare_once(config: Config, sources, storage: str) -> None:
    """Prepare the data before the trials start, so that they all find it in the cache."""
    prepared, cache = prepare_data(config, sources, storage)
    if cache:
        for p in prepared.values():
            cache.release(p.cache_key)


def _row(result, metric: str, max_steps: int) -> dict[str, Any]:
    """A trial's outcome from Tune's result (Tune adds `trial_id` to every reported result)."""
    m = result.metrics or {}
    step = m.get("step")
    outcome = FAILED if result.error else ended_outcome(step, max_steps)
    return {"trial": m.get("trial_id"), "outcome": outcome, "step": step, metric: m.get(metric),
            **(result.config or {})}
