"""The sweep's MLflow parent run, kept up to date as trials start and end (driver: a Tune callback).

The parent holds the search space, the best trial so far (its run, metric and config) and a table of
every trial; each trial's own run is its child. An LR x batch sweep (`sweep.lr_scaling`) also gets its
heat-map when it ends (`sweeps.heatmap`). An ASHA stop is recorded on the child as such, not as
a failure.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune import Callback

from openclaw.config import Config
from openclaw.sweeps.heatmap import log_lr_batch
from openclaw.sweeps.trial import trial_config, trial_name
from openclaw.tracking.redact import public_uri, redacted
from openclaw.tracking.writer import MlflowWriter

FINISHED, STOPPED_EARLY, FAILED, RUNNING = "finished", "stopped_early", "failed", "running"

_FULL_URIS: dict[str, str] = {}
"""This driver's tracking URIs by their public form (`remember_uri`): Tune saves the tracker with the
experiment, without the URI's credentials, and the tracker `--resume` unpickles takes its URI back here."""


def remember_uri(uri: str) -> None:
    _FULL_URIS[public_uri(uri)] = uri


class SweepTracker(Callback):
    """A Tune callback on the driver: keeps the parent run (best trial, trials table) up to date and
    marks each child run's outcome. Picklable (Tune saves it with the experiment, for `--resume`)."""

    def __init__(self, config: Config, tracking_uri: str, experiment_id: str, parent_run_id: str, storage: str):
        remember_uri(tracking_uri)
        remember_uri(storage)
        self.sweep_name, self.uri, self.exp_id, self.parent = config.name, tracking_uri, experiment_id, parent_run_id
        self.storage = storage
        self.metric, self.mode, self.max_steps = config.sweep.metric, config.sweep.mode, config.train.max_steps
        self.base = redacted(config.resolved())  # Tune saves this callback with the experiment: no credential
        self._child: dict[str, str] = {}
        self._best: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What Tune saves (`tuner.pkl`): the tracking and storage URIs without their user info (a database's
        password, an object store's keys)."""
        return {**self.__dict__, "uri": public_uri(self.uri), "storage": public_uri(self.storage)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.uri, self.storage = (_FULL_URIS.get(u, u) for u in (self.uri, self.storage))

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
        if self.base["sweep"].get("lr_scaling"):  # an LR x batch sweep: its heat-map, with the noise scale
            log_lr_batch(self._client(), self.parent, self.rows(trials), self.metric, self.base)

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
            best = best_row(done, self.metric, self.mode)
            if best is None:
                return
            client.log_metric(self.parent, f"best/{self.metric}", best[self.metric], step=len(done))
            counts = {o: sum(r["outcome"] == o for r in rows) for o in (FINISHED, STOPPED_EARLY, FAILED, RUNNING)}
            client.set_tag(self.parent, "mlflow.note.content", (
                f"Sweep over {', '.join(trials[0].config)}: {len(rows)} trial(s) so far, {counts[FINISHED]} finished, "
                f"{counts[STOPPED_EARLY]} stopped early, {counts[FAILED]} failed, {counts[RUNNING]} running. Best: "
                f"trial {best['trial']} ({self.metric} {_short(best[self.metric])}), run {best['run_id']}; its "
                f"config is `best_config.yaml`, every trial is in `trials.json`."))
            if best["trial"] != self._best:
                params = {k: best[k] for k in trials[0].config}
                for key, value in {"best.trial": best["trial"], "best.run_id": best["run_id"] or "",
                                   "best.params": json.dumps(params), "best.step": str(best["step"])}.items():
                    client.set_tag(self.parent, key, value)
                cfg = trial_config(self.base, params, sweep_name=self.sweep_name, trial_id=best["trial"],
                                   storage=self.storage, tracking_uri=self.uri,
                                   parent_run_id=None).resolved()
                client.log_dict(self.parent, redacted(cfg), "best_config.yaml")
                self._best = best["trial"]  # written whole: a write that failed is tried again at the next trial
        except Exception as e:  # the parent's records never stop the sweep; they are rebuilt at the next trial
            print(f"openclaw: could not update the sweep's MLflow run {self.parent}: {e}", file=sys.stderr, flush=True)

    def _client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def best_row(done: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best of the ended trials with a finite metric (None: none has one): among those that finished,
    if any did. A trial ASHA stopped was judged worse than others at one of its rungs, and its last metric
    is from an earlier step than the finished ones' (a stopped trial that had not yet overfit can show a
    lower loss than every finished one). A NaN compares false with everything: listed first, it won."""
    ranked = [r for r in done if _finite(r.get(metric))]
    finished = [r for r in ranked if r["outcome"] == FINISHED] or ranked
    return (min if mode == "min" else max)(finished, key=lambda r: r[metric]) if finished else None


def _finite(value: Any) -> bool:
    """A metric a trial can be ranked by (a number, not NaN or infinite)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def ended_outcome(step: int | None, max_steps: int) -> str:
    """How a trial that ended without an error ended: at its last step, or stopped early by the scheduler."""
    return FINISHED if (step or 0) >= max_steps else STOPPED_EARLY


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)
