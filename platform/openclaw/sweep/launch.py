"""Driver side of `openclaw sweep CONFIG`: a Ray Tune search over whole openclaw training jobs.

One MLflow parent run per sweep holds the search space, the best trial so far (its run, metric and
config, updated as trials finish) and a table of every trial. Each trial is a child run (see
`sweep_trial`). ASHA's early stops are graceful (the trial checkpoints and returns) and recorded as
such on the child run, not as failures. A sweep whose driver died resumes with `--resume`: Tune keeps
finished trials finished, and unfinished ones resume their own checkpoints.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from openclaw.config import Config, redacted, validate
from openclaw.errors import ConfigError
from openclaw.sweep.config import SweepConfig, check_against, grid_size
from openclaw.sweep.trial import run_trial, trial_config, trial_name

FINISHED, STOPPED_EARLY, FAILED, RUNNING = "finished", "stopped_early", "failed", "running"
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


# ---- checks before anything starts -----------------------------------------------------------------

def check_sweep(config: Config) -> SweepConfig:
    """Everything about the sweep that can be wrong, found before Ray or MLflow start."""
    s = config.sweep
    if s is None:
        raise ConfigError(f"config {config.name!r} has no `sweep:` section. Add one with `metric`, `mode` and a "
                          f"`space` of dotted keys (see jobs/configs/digits_sweep.yaml), or use `openclaw train`.")
    problems = check_against(s, config.resolved())
    if not config.tracking.enabled:
        problems.append("a sweep records its trials in MLflow: set `tracking.enabled: true`")
    if problems:
        raise ConfigError("Invalid sweep: " + "; ".join(problems) + ".")
    for key, spec in s.space.items():  # each tuned key must exist and accept the values it will get
        values = spec.choice if spec.kind == "choice" else list(spec.args)
        for value in values:
            try:
                trial_config(config.resolved(), {key: value}, sweep_name=config.name, trial_id="check",
                             storage="/tmp", tracking_uri="sqlite://", parent_run_id=None)
            except ConfigError as e:
                raise ConfigError(f"`sweep.space.{key}` gives {value!r}, which the config refuses: {e}") from None
    if s.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("`sweep.search: optuna` needs optuna: pip install 'openclaw[optuna]', or use "
                          "`search: random`.")
    return s


# ---- Tune's pieces --------------------------------------------------------------------------------

def tune_space(s: SweepConfig) -> dict[str, Any]:
    from ray import tune
    if s.search == "grid":
        return {k: tune.grid_search(list(p.choice)) for k, p in s.space.items()}
    make = {"choice": lambda a: tune.choice(list(a)), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[p.kind](p.args) for k, p in s.space.items()}


def search_alg(s: SweepConfig):
    """Random and grid search: Tune's variant generator, seeded, which limits concurrency itself (Tune
    ignores `max_concurrent_trials` for it); optuna: a `Searcher`, limited by `max_concurrent_trials`."""
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(seed=s.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)


def _ashascheduler():
    from ray.tune.schedulers import ASHAScheduler

    class GracefulASHA(ASHAScheduler):
        """ASHA whose stops are graceful. Tune would kill the trial's actor, which leaves its worker group's
        placement group behind (a CPU per stopped trial, until the job ends) and can cut its last metrics
        off. Instead the trial is asked, through its tracking service, to checkpoint at its next step and
        return; it then ends like a finished trial and shuts its workers down. A trial at its last step is
        never stopped: it logs its model."""

        def __init__(self, *, max_steps: int, sweep_name: str, **kwargs):
            super().__init__(time_attr="step", max_t=max_steps, **kwargs)
            self.max_steps, self.sweep_name, self.stopping = max_steps, sweep_name, set()

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == self.STOP and result.get("step", 0) < self.max_steps and trial.trial_id not in self.stopping:
                self.stopping.add(trial.trial_id)
                ask_trial_to_stop(trial_name(self.sweep_name, trial.trial_id), "stopped early by ASHA")
            return self.CONTINUE

    return GracefulASHA


def scheduler(s: SweepConfig, config: Config):
    if s.scheduler != "asha":
        return None
    return _ashascheduler()(max_steps=config.train.max_steps, sweep_name=config.name,
                            grace_period=s.asha.grace_period_steps, reduction_factor=s.asha.reduction_factor)


def ask_trial_to_stop(job_name: str, reason: str) -> None:
    """Ask a trial's workers, through its tracking service, to checkpoint at their next step and return."""
    import ray
    from openclaw.tracking.service import service_name_prefix
    prefix = service_name_prefix(job_name)
    for name in ray.util.list_named_actors():
        if name.startswith(prefix):
            with contextlib.suppress(Exception):  # a service from an earlier attempt may be gone already
                ray.get(ray.get_actor(name).request_stop.remote(reason), timeout=30)


# ---- the parent run ---------------------------------------------------------------------------------

class SweepTracker(Callback):
    """A Tune callback on the driver: keeps the parent run (best trial, trials table) up to date and
    marks each child run's outcome. Picklable (Tune saves it with the experiment, for `--resume`)."""

    def __init__(self, config: Config, tracking_uri: str, experiment_id: str, parent_run_id: str, storage: str):
        self.sweep_name, self.uri, self.exp_id, self.parent = config.name, tracking_uri, experiment_id, parent_run_id
        self.storage = storage
        self.metric, self.mode, self.max_steps = config.sweep.metric, config.sweep.mode, config.train.max_steps
        self.base = config.resolved()
        self._child: dict[str, str] = {}
        self._best: str | None = None

    # -- Tune's hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"openclaw: trial {trial.trial_id} started ({params})", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome, step, value = self._outcome(trial, completed=True)
        run_id = self.child_run(trial.trial_id)
        if outcome == STOPPED_EARLY and run_id:
            self._mark_stopped_early(run_id, step, value)
        how = "stopped early by ASHA" if outcome == STOPPED_EARLY else "finished"
        if (trial.last_result or {}).get("already_finished"):
            how = "had finished before the sweep's driver stopped (not run again); it ended"
        print(f"openclaw: trial {trial.trial_id} {how} at step {step}: {self.metric} {_short(value)}", flush=True)
        self.update_parent(trials, completing=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"openclaw: trial {trial.trial_id} failed; its error is in the child run and in "
              f"{trial.local_path}", file=sys.stderr, flush=True)
        self.update_parent(trials)

    def on_experiment_end(self, trials, **info):
        self.update_parent(trials)

    # -- the records
    def _outcome(self, trial, completed: bool = False) -> tuple[str, int | None, float | None]:
        """(outcome, step, metric) of the trial's last result; `completed`: Tune is completing it now (its
        status may not say so yet)."""
        last = trial.last_result or {}
        step, value = last.get("step"), last.get(self.metric)
        if trial.status == "ERROR":
            return FAILED, step, value
        if trial.status != "TERMINATED" and not completed:
            return RUNNING, step, value
        return ended_outcome(step, self.max_steps), step, value

    def child_run(self, trial_id: str) -> str | None:
        if trial_id not in self._child:
            runs = self._client().search_runs(
                [self.exp_id], filter_string=f"tags.`openclaw.name` = '{trial_name(self.sweep_name, trial_id)}'")
            if runs:
                self._child[trial_id] = runs[0].info.run_id
        return self._child.get(trial_id)

    def _mark_stopped_early(self, run_id: str, step: int | None, value: float | None) -> None:
        from openclaw.tracking.service import MlflowWriter
        client = self._client()
        client.set_tag(run_id, "openclaw.outcome", STOPPED_EARLY)
        client.set_tag(run_id, "mlflow.note.content", f"Stopped early by the sweep's ASHA scheduler at step {step} "
                                                      f"of {self.max_steps} ({self.metric} {_short(value)}).")
        MlflowWriter(self.uri, run_id).apply("event", "stopped_early", {"step": step, "cause": "ASHA",
                                                                        self.metric: value}, time.time())
        # (the trial closed its run as KILLED itself when it stopped on the scheduler's request)

    def rows(self, trials, completing=None) -> list[dict[str, Any]]:
        rows = []
        for t in sorted(trials, key=lambda t: t.trial_id):
            outcome, step, value = self._outcome(t, completed=t is completing)
            rows.append({"trial": t.trial_id, "run_id": self.child_run(t.trial_id), "outcome": outcome, "step": step,
                         self.metric: value, **{k: v for k, v in t.config.items()}})
        return rows

    def update_parent(self, trials, completing=None) -> None:
        """The trials table, and the best trial so far (its run, metric and config) on the parent run."""
        try:
            rows = self.rows(trials, completing)
            client = self._client()
            columns = list(rows[0])  # the whole table each time (MLflow's log_table would append to it)
            client.log_dict(self.parent, {"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]},
                            "trials.json")
            done = [r for r in rows if r["outcome"] in (FINISHED, STOPPED_EARLY) and r[self.metric] is not None]
            if not done:
                return
            best = best_row(done, self.metric, self.mode)
            client.log_metric(self.parent, f"best/{self.metric}", best[self.metric], step=len(done))
            counts = {o: sum(r["outcome"] == o for r in rows) for o in (FINISHED, STOPPED_EARLY, FAILED, RUNNING)}
            client.set_tag(self.parent, "mlflow.note.content", (
                f"Sweep over {', '.join(trials[0].config)}: {len(rows)} trial(s) so far, {counts[FINISHED]} finished, "
                f"{counts[STOPPED_EARLY]} stopped early, {counts[FAILED]} failed, {counts[RUNNING]} running. Best: "
                f"trial {best['trial']} ({self.metric} {_short(best[self.metric])}), run {best['run_id']}; its "
                f"config is `best_config.yaml`, every trial is in `trials.json`."))
            if best["trial"] != self._best:
                self._best = best["trial"]
                params = {k: best[k] for k in trials[0].config}
                for key, value in {"best.trial": best["trial"], "best.run_id": best["run_id"] or "",
                                   "best.params": json.dumps(params), "best.step": str(best["step"])}.items():
                    client.set_tag(self.parent, key, value)
                cfg = trial_config(self.base, params, sweep_name=self.sweep_name, trial_id=best["trial"],
                                   storage=self.storage, tracking_uri=self.uri,
                                   parent_run_id=None).resolved()
                client.log_dict(self.parent, redacted(cfg), "best_config.yaml")
        except Exception as e:  # the parent's records never stop the sweep; they are rebuilt at the next trial
            print(f"openclaw: could not update the sweep's MLflow run {self.parent}: {e}", file=sys.stderr, flush=True)

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.uri)


def best_row(done: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The best of the ended trials: among those that finished, if any did. A trial ASHA stopped was judged
    worse than others at one of its rungs, and its last metric is from an earlier step than the finished
    ones' (a stopped trial that had not yet overfit can show a lower loss than every finished one)."""
    finished = [r for r in done if r["outcome"] == FINISHED] or done
    return (min if mode == "min" else max)(finished, key=lambda r: r[metric])


def ended_outcome(step: int | None, max_steps: int) -> str:
    """How a trial that ended without an error ended: at its last step, or stopped early by the scheduler."""
    return FINISHED if (step or 0) >= max_steps else STOPPED_EARLY


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


# ---- the sweep ----------------------------------------------------------------------------------

def sweep(config: Config, *, resume: bool = False, address: str | None = None, verbose: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the config's sweep to the end."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from openclaw.launch.session import connect_ray, preflight, storage_path, tracking_uri
    from openclaw.tracking.run import open_run

    s = check_sweep(config)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # openclaw prints its own UI link
    sources = preflight(config)  # the data's files and columns, before anything starts
    uri, storage = tracking_uri(config), storage_path(config)
    exp_path = f"{storage.rstrip('/')}/{config.name}"
    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise ConfigError(f"there is no sweep {config.name!r} to resume in {storage} (no Tune state under "
                          f"{exp_path}). Drop --resume to start it.")
    if exists and not resume:
        raise ConfigError(f"sweep {config.name!r} already exists in {storage}. Pass --resume to continue it "
                          f"(finished trials are kept), or set a new `name` to start another.")
    parent_id, exp_id, _ = open_run(config, uri, storage)
    client = MlflowClient(uri)
    client.set_tag(parent_id, "openclaw.kind", "sweep")
    client.log_dict(parent_id, {k: v.model_dump(exclude_none=True) for k, v in s.space.items()}, "sweep_space.json")
    n_trials = grid_size(s) if s.search == "grid" else s.num_samples
    print(f"openclaw: {'resuming' if resume else 'starting'} sweep {config.name!r}: {n_trials} trials, "
          f"{s.max_concurrent} at a time, {s.search} search{', ASHA' if s.scheduler == 'asha' else ''}, "
          f"{s.mode} {s.metric}; MLflow parent run {parent_id} ({uri})", flush=True)

    per_trial = 1 + config.scaling.max_workers * int(config.scaling.resources_per_worker.get("CPU", 1))
    connect_ray(address, verbose, min_cpus=s.max_concurrent * per_trial + 2)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SWEEP_STATE_SAVE_S)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # an off-grid checkpoint (SIGTERM) may precede the first log
    base = _absolute_data_paths(config.resolved(), storage)
    _prepare_once(validate(base), sources, storage)
    trainable = tune.with_parameters(run_trial, base=base, sweep_name=config.name, storage=storage,
                                     tracking_uri=uri, parent_run_id=parent_id)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_space(s),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        max_concurrent_trials=s.max_concurrent if s.search == "optuna" else None,
                                        search_alg=search_alg(s),
                                        scheduler=scheduler(s, config)),
            run_config=tune.RunConfig(name=config.name, storage_path=storage, verbose=1 if verbose else 0,
                                      callbacks=[SweepTracker(config, uri, exp_id, parent_id, storage)]))
    try:
        grid = tuner.fit()
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(parent_id, status="KILLED")
        raise
    trials = [_row(r, s.metric, config.train.max_steps) for r in grid]
    failed = [t for t in trials if t["outcome"] == FAILED]
    client.set_terminated(parent_id, status="FAILED" if len(failed) == len(trials) else "FINISHED")
    parent = client.get_run(parent_id).data
    result = SweepResult(parent_id, parent.tags.get("best.trial"), parent.tags.get("best.run_id") or None,
                         parent.metrics.get(f"best/{s.metric}"), json.loads(parent.tags.get("best.params", "{}")),
                         trials, exp_id, uri)
    if failed:
        print(f"openclaw: {len(failed)} of {len(trials)} trial(s) failed: {', '.join(str(t['trial']) for t in failed)}",
              file=sys.stderr, flush=True)
    return result


def _absolute_data_paths(raw: dict[str, Any], storage: str) -> dict[str, Any]:
    """Local data paths made absolute from the driver's working folder: trials run in Tune's trial
    folders (and a trial's log of its config then says where the data was). All trials share the
    sweep's prepared-data cache."""
    for key in ("train", "val"):
        path = raw["data"].get(key)
        if path and "://" not in path:
            raw["data"][key] = os.path.abspath(os.path.expanduser(path))
    if not raw["data"]["cache"].get("dir") and "://" not in storage:
        raw["data"]["cache"]["dir"] = os.path.join(storage, ".data-cache")
    return raw


def _prepare_once(config: Config, sources, storage: str) -> None:
    """Prepare the data before the trials start, so that they all find it in the cache."""
    from openclaw.launch.session import prepare_data
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
