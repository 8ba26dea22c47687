"""An Optuna sweep end to end on the session's real Ray instance with Ray Tune and a real MLflow sqlite
store: Optuna's TPE samples each trial (a continuous learning rate, a width), every trial is a whole
openclaw run nested under the sweep's parent run, Optuna's study is told each trial's metric, and the
parent records the best."""
import json

import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.search.optuna import OptunaSearch

import openclaw
from conftest import REPO, sqlite_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _optuna_asks(seed: int, n: int) -> list[dict]:
    """What Optuna's TPE, seeded as the sweep is, proposes first for the sweep's space."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    space = {"train.optimizer.lr": optuna.distributions.FloatDistribution(1.0e-4, 3.0e-2, log=True),
             "model.kwargs.hidden": optuna.distributions.CategoricalDistribution([16, 32])}
    return [study.ask(space).params for _ in range(n)]


def test_an_optuna_sweep_nests_its_trials_under_the_parent_and_records_the_best(ray_local, digits_dir, tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits-sweep.yaml", {
        "name": "optuna-sweep", "data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "val"),
        "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": uri,
        "train.max_steps": 20, "train.eval_every": 10, "train.log_every": 10, "checkpoint.every_steps": 10,
        "sweep.search": "optuna", "sweep.scheduler": "none", "sweep.num_samples": 2, "sweep.max_concurrent": 2,
        "sweep.space": {"train.optimizer.lr": {"loguniform": [1.0e-4, 3.0e-2]},
                        "model.kwargs.hidden": {"choice": [16, 32]}}})
    result = openclaw.sweep(cfg)
    keys = ("train.optimizer.lr", "model.kwargs.hidden")
    assert [(t["outcome"], t["step"]) for t in result.trials] == [("finished", 20)] * 2

    # ---- Optuna chose the trials, and its study was told how each one ended
    sampled = [{k: t[k] for k in keys} for t in result.trials]
    assert sorted(sampled, key=str) == sorted(_optuna_asks(cfg.sweep.seed, 2), key=str)
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "runs" / "optuna-sweep"))
    told = {t.params["train.optimizer.lr"]: t.value for t in searcher._ot_study.trials
            if t.state == optuna.trial.TrialState.COMPLETE}
    assert told == pytest.approx({t["train.optimizer.lr"]: t["val/loss"] for t in result.trials})

    # ---- MLflow: the parent run, its two children, and the best of them
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["openclaw.kind"] == "sweep"
    space = json.load(open(client.download_artifacts(result.parent_run_id, "sweep_space.json", str(tmp_path))))
    assert space["train.optimizer.lr"] == {"loguniform": [1.0e-4, 3.0e-2]}
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    finals = {k.info.run_id: k.data.metrics["val/loss"] for k in kids}
    by_lr = {float(k.data.params["train.optimizer.lr"]): k.data.metrics["val/loss"] for k in kids}
    assert by_lr == pytest.approx({t["train.optimizer.lr"]: t["val/loss"] for t in result.trials})
    best = min(finals, key=finals.get)
    assert parent.data.tags["best.run_id"] == best == result.best_run_id
    assert parent.data.metrics["best/val/loss"] == pytest.approx(finals[best]) == result.best_metric
    best_params = client.get_run(best).data.params
    assert json.loads(parent.data.tags["best.params"]) == pytest.approx(
        {"train.optimizer.lr": float(best_params["train.optimizer.lr"]),
         "model.kwargs.hidden": int(best_params["model.kwargs.hidden"])})
    best_cfg = openclaw.load_config(client.download_artifacts(result.parent_run_id, "best_config.yaml", str(tmp_path)))
    assert best_cfg.train.optimizer.lr == pytest.approx(float(best_params["train.optimizer.lr"]))
    assert best_cfg.model.kwargs["hidden"] == int(best_params["model.kwargs.hidden"]) and best_cfg.sweep is None
    table = json.load(open(client.download_artifacts(result.parent_run_id, "trials.json", str(tmp_path))))
    assert len(table["data"]) == 2
