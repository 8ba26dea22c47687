"""One sweep trial (a Tune trial actor): a whole openclaw training job (elastic, fault
tolerant, one MLflow run nested under the sweep's) of the sweep's config with the sampled keys set.

The trial is the Train V2 pattern: a Tune function that calls `TorchTrainer.fit` with Tune's report
callback, so every checkpoint report reaches Tune's scheduler. A trial restarted after its sweep's
driver died keeps its name, and so resumes its own checkpoint and MLflow run.
"""
from __future__ import annotations

import copy
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from openclaw.config import Config, validate
from openclaw.config_files import set_dotted
from openclaw.constants import apply_secret_env
from openclaw.errors import RunStopped
from openclaw.launch.session import train
from openclaw.sweeps.config import trial_lr
from openclaw.tracking.job_file import finished_run


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trials_storage(storage: str, sweep_name: str) -> str:
    """Where the trials' runs (checkpoints, job files) live: beside the sweep's Tune state."""
    return f"{storage.rstrip('/')}/{sweep_name}/trials"


def trial_config(base: dict[str, Any], params: dict[str, Any], *, sweep_name: str, trial_id: str, storage: str,
                 tracking_uri: str, parent_run_id: str | None) -> Config:
    """The trial's config: the sweep's file without its `sweep:` section, with `params` (dotted keys) set
    (and with `sweep.lr_scaling`, the LR scaled to the trial's global batch)."""
    raw = copy.deepcopy(base)
    sweep = raw.pop("sweep", None) or {}
    for key, value in params.items():
        set_dotted(raw, key, value)
    if sweep.get("lr_scaling"):
        raw["train"]["optimizer"]["lr"] = trial_lr(raw, sweep["lr_scaling"])
    raw["name"] = trial_name(sweep_name, trial_id)
    raw["checkpoint"]["storage"] = trials_storage(storage, sweep_name)
    raw["tracking"]["uri"], raw["tracking"]["parent_run_id"] = tracking_uri, parent_run_id
    return validate(raw, source=f"sweep trial {trial_id} ({', '.join(f'{k}={v!r}' for k, v in params.items())})")


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_name: str, storage: str, tracking_uri: str,
              parent_run_id: str, secrets: dict[str, str] | None = None) -> None:
    """The Tune trainable (bound with `tune.with_parameters`). `secrets`: the sweep driver's credentials."""
    apply_secret_env(secrets or {})
    config = trial_config(base, params, sweep_name=sweep_name, trial_id=ray.tune.get_context().get_trial_id(),
                          storage=storage, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    done = finished_run(config, config.checkpoint.storage)
    if done:  # finished before the sweep's driver died (Tune saves its state every few seconds): report it, no rerun
        print(f"openclaw: trial {config.name} already finished at step {done['step']}; not running it again",
              flush=True)
        ray.tune.report({**done["metrics"], "step": done["step"], "already_finished": 1})
        return
    try:
        train(config, callbacks=[TuneReportCallback()])
    except RunStopped:  # the scheduler stopped it: its stop checkpoint is its last result
        pass
