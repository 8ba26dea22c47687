"""The `sweep:` section and the checks `openclaw sweep` makes before anything starts (no Ray, no MLflow)."""
import os
from pathlib import Path

import pytest

from openclaw.config import load_config
from openclaw.errors import ConfigError
from openclaw.sweeps.checks import check_sweep
from openclaw.sweeps.config import grid_size
from openclaw.sweeps.trial import trial_config

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "jobs" / "configs" / "digits-sweep.yaml"


def test_shipped_sweep_config_passes_every_check():
    cfg = load_config(SWEEP)
    s = check_sweep(cfg)
    assert s.num_samples >= 6 and s.scheduler == "asha" and s.space["train.optimizer.lr"].kind == "loguniform"


@pytest.mark.parametrize("spec, message", [
    ({"uniform": [1, 0]}, r"low < high"),
    ({"loguniform": [0, 1]}, r"low bound > 0"),
    ({"uniform": [1.0e-4, float("inf")]}, r"`uniform` needs finite bounds"),
    ({"choice": []}, r"at least one value"),
    ({"choice": [1], "uniform": [0, 1]}, r"exactly one of choice, uniform, loguniform, randint"),
    ({"normal": [0, 1]}, r"unknown key `sweep.space.train.optimizer.lr.normal`"),
])
def test_bad_distribution_names_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(SWEEP, {"sweep.space": {"train.optimizer.lr": spec}})
    assert "sweep.space.train.optimizer.lr" in str(e.value)


def test_tuned_key_must_exist_and_accept_its_values():
    with pytest.raises(ConfigError, match=r"`sweep.space.train.optimiser.lr` gives 0.1.*unknown key `train.optimiser`"):
        check_sweep(load_config(SWEEP, {"sweep.space": {"train.optimiser.lr": {"choice": [0.1]}}}))
    with pytest.raises(ConfigError, match=r"`sweep.space.train.log_every` gives 0.*greater than 0"):
        check_sweep(load_config(SWEEP, {"sweep.space": {"train.log_every": {"choice": [0, 10]}}}))
    with pytest.raises(ConfigError, match=r"cannot tune checkpoint.storage"):
        load_config(SWEEP, {"sweep.space": {"checkpoint.storage": {"choice": ["a", "b"]}}})


def test_metric_must_be_reported_with_every_checkpoint():
    with pytest.raises(ConfigError, match=r"set `train.eval_every` to a divisor of `checkpoint.every_steps` \(50\)"):
        check_sweep(load_config(SWEEP, ["train.eval_every=30"]))
    with pytest.raises(ConfigError, match=r"`data.val` is not set"):
        check_sweep(load_config(SWEEP, ["data.val=null"]))
    with pytest.raises(ConfigError, match=r"must be a `train/...` or `val/...` metric"):
        check_sweep(load_config(SWEEP, ["sweep.metric=accuracy"]))
    check_sweep(load_config(SWEEP, ["sweep.metric=train/loss", "data.val=null"]))


def test_a_train_metric_no_trial_reports_is_refused():
    """`val/los` was refused, `train/los` accepted: the sweep then waited on a metric no trial reports."""
    with pytest.raises(ConfigError, match=r"`sweep.metric` is train/los, which no trial reports"):
        check_sweep(load_config(SWEEP, ["sweep.metric=train/los"]))
    assert check_sweep(load_config(SWEEP, ["sweep.metric=train/grad_norm", "sweep.mode=min"])) is not None


def test_every_train_metric_the_code_logs_is_one_a_sweep_may_tune_on():
    import re

    from conftest import REPO
    from openclaw.sweeps.config import TRAIN_METRICS
    logged = {m for p in (REPO / "platform" / "openclaw").rglob("*.py") if p.parts[-2:] != ("sweeps", "config.py")
              for m in re.findall(r'"(train/[a-z_]+)"', p.read_text())}  # (the list itself left out)
    assert logged == set(TRAIN_METRICS), logged ^ set(TRAIN_METRICS)


def test_asha_grace_period_must_leave_room_to_stop():
    with pytest.raises(ConfigError, match=r"grace_period_steps` \(300\) must be below `train.max_steps` \(300\)"):
        check_sweep(load_config(SWEEP, ["sweep.asha.grace_period_steps=300"]))
    with pytest.raises(ConfigError, match=r"multiple of `checkpoint.every_steps` \(50\)"):
        check_sweep(load_config(SWEEP, ["sweep.asha.grace_period_steps=75"]))


def test_a_metric_no_trial_reports_or_the_wrong_way_round_is_refused():
    """`val/los` was accepted, and every trial ran to its end with nothing to compare."""
    with pytest.raises(ConfigError, match=r"`sweep.metric` is val/los, which no trial reports: its evaluations report "
                                          r"val/loss and val/accuracy"):
        check_sweep(load_config(SWEEP, ["sweep.metric=val/los"]))
    with pytest.raises(ConfigError, match=r"val/accuracy with `sweep.mode: min`.*set `sweep.mode: max`"):
        check_sweep(load_config(SWEEP, ["sweep.metric=val/accuracy", "sweep.mode=min"]))
    check_sweep(load_config(SWEEP, ["sweep.metric=val/accuracy", "sweep.mode=max"]))
    with pytest.raises(ConfigError, match=r"its evaluations report val/loss$|its evaluations report val/loss[;.]"):
        check_sweep(load_config(SWEEP, ["sweep.metric=val/accuracy", "sweep.mode=max", "task=language_modeling"]))


def test_grid_search_takes_choices_only_and_counts_combinations():
    with pytest.raises(ConfigError, match=r"train.optimizer.lr is not a choice"):
        load_config(SWEEP, ["sweep.search=grid"])
    cfg = load_config(SWEEP, {"sweep.search": "grid", "sweep.num_samples": 2,
                              "sweep.space": {"train.optimizer.lr": {"choice": [1e-3, 1e-2]},
                                              "model.kwargs.hidden": {"choice": [32, 64, 128]}}})
    assert grid_size(cfg.sweep) == 2 * 2 * 3


def test_no_sweep_section_says_what_to_add():
    with pytest.raises(ConfigError, match=r"has no `sweep:` section"):
        check_sweep(load_config(REPO / "jobs" / "configs" / "digits.yaml"))


def test_trial_config_sets_the_sampled_keys_and_its_own_name_storage_and_parent():
    base = load_config(SWEEP).resolved()
    cfg = trial_config(base, {"train.optimizer.lr": 0.01, "model.kwargs.hidden": 32}, sweep_name="s",
                       trial_id="abc_00001", storage="/data/runs", tracking_uri="http://127.0.0.1:5000",
                       parent_run_id="p" * 32)
    assert cfg.train.optimizer.lr == 0.01 and cfg.model.kwargs["hidden"] == 32 and cfg.model.kwargs["depth"] == 2
    assert cfg.name == "s-abc_00001" and cfg.checkpoint.storage == "/data/runs/s/trials" and cfg.sweep is None
    assert cfg.tracking.parent_run_id == "p" * 32 and cfg.tracking.uri == "http://127.0.0.1:5000"
    assert base["train"]["optimizer"]["lr"] == 3e-3  # the base is untouched


def test_each_search_maps_to_tune():
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from openclaw.sweeps.search import search_alg, tune_space
    cfg = load_config(SWEEP)
    space = tune_space(cfg.sweep)
    assert isinstance(space["train.optimizer.lr"], tune.search.sample.Float)
    assert space["model.kwargs.hidden"].categories == [32, 128, 256]
    assert isinstance(search_alg(cfg.sweep), BasicVariantGenerator)
    assert isinstance(search_alg(load_config(SWEEP, ["sweep.search=optuna"]).sweep), OptunaSearch)
    grid = tune_space(load_config(SWEEP, {"sweep.search": "grid", "sweep.space": {
        "model.kwargs.hidden": {"choice": [32, 64]}}}).sweep)
    assert grid == {"model.kwargs.hidden": {"grid_search": [32, 64]}}


def test_the_best_trial_is_a_finished_one_unless_none_finished():
    from openclaw.sweeps.parent_run import FINISHED, STOPPED_EARLY, best_row
    # The CI case: ASHA cut a trial at its 200-step rung; at step 250 its loss was below the finished ones'.
    rows = [{"trial": "a", "outcome": FINISHED, "val/loss": 0.1093},
            {"trial": "b", "outcome": STOPPED_EARLY, "val/loss": 0.1077},
            {"trial": "c", "outcome": FINISHED, "val/loss": 0.1098}]
    assert best_row(rows, "val/loss", "min")["trial"] == "a"
    assert best_row(rows, "val/loss", "max")["trial"] == "c"
    stopped = [r for r in rows if r["outcome"] == STOPPED_EARLY] + [{"trial": "d", "outcome": STOPPED_EARLY,
                                                                      "val/loss": 2.3}]
    assert best_row(stopped, "val/loss", "min")["trial"] == "b"
    # a NaN loss compares false with everything: listed first, it was the best of min and max alike
    diverged = [{"trial": "n", "outcome": FINISHED, "val/loss": float("nan")}] + rows
    assert best_row(diverged, "val/loss", "min")["trial"] == "a" and best_row(diverged, "val/loss", "max")["trial"] == "c"
    assert best_row(diverged[:1], "val/loss", "min") is None


def test_a_space_that_tunes_max_steps_is_refused():
    """Every trial was judged against the base `train.max_steps`: a trial of 100 steps that reached them
    was tagged 'stopped early by ASHA at step 100 of 300', and left out of the best."""
    with pytest.raises(ConfigError, match=r"`sweep.space` cannot tune train.max_steps: the sweep counts every trial"):
        load_config(SWEEP, {"sweep.space": {"train.max_steps": {"choice": [100, 300]}}})
    with pytest.raises(ConfigError, match=r"`sweep.space` cannot tune train.max_steps"):  # a whole section set it
        load_config(SWEEP, {"sweep.space": {"train": {"choice": [{"max_steps": 5000}]}}})


def test_the_metrics_cadence_is_checked_for_each_value_the_space_gives():
    """Only the file's values were checked: `train.eval_every` tuned to 30, with checkpoints every 50, passed,
    and the trials' checkpoints came with no `val/` metric to report, where the same 30 in the file is refused."""
    space = {"train.optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "train.eval_every": {"choice": [50, 30]}}
    cfg = load_config(SWEEP, {"sweep.space": space, "sweep.metric": "val/loss", "checkpoint.every_steps": 50,
                              "train.eval_every": 50})
    with pytest.raises(ConfigError, match=r"`sweep.space` gives train.eval_every=30, which the sweep refuses: "
                                          r"`sweep.metric` is val/loss, .* divisor of `checkpoint.every_steps` \(50\)"):
        check_sweep(cfg)
    check_sweep(load_config(SWEEP, {"sweep.space": {**space, "train.eval_every": {"choice": [50, 25]}},
                                    "sweep.metric": "val/loss", "checkpoint.every_steps": 50, "train.eval_every": 50}))


@pytest.mark.parametrize("space,said", [
    ({"model.kwargs.hidden": {"loguniform": [16, 256]}},
     r"`sweep.space.model.kwargs.hidden` gives 16.0, .* must be an integer .* use `randint` \(or `choice`\)"),
    ({"train.global_batch_size": {"choice": [16, 64]}, "train.micro_batch_size": {"choice": [8, 32]}},
     r"`sweep.space` gives train.global_batch_size=16, train.micro_batch_size=32, which the config refuses: "
     r".*must be divisible by `train.micro_batch_size`"),
    ({"train.global_batch_size": {"randint": [32, 64]}},  # its ends passed; 63, a draw, does not
     r"`sweep.space.train.global_batch_size` gives 63, which the config refuses"),
    ({"train.schedule.warmup_steps": {"uniform": [0, 100]}},  # the value tried inside was 37.0, whole
     r"`sweep.space.train.schedule.warmup_steps` gives 37.00000000000001, .* valid integer.* use `randint`"),
])
def test_a_space_whose_trials_would_fail_is_refused_before_any_starts(space, said):
    """Each passed, and trials failed: a float range over a whole-number kwarg (37.4 hidden units), a batch
    with a micro-batch that does not divide it, a randint whose draws the batch check refuses."""
    with pytest.raises(ConfigError, match=said):
        check_sweep(load_config(SWEEP, {"sweep.space": space, "sweep.scheduler": "none",
                                        "train.global_batch_size": 64, "train.micro_batch_size": 8}))


def test_a_randints_high_end_is_not_a_value_it_draws():
    """randint [64, 65] draws 64 alone: the 65 the batch check refuses refused the whole space."""
    space = {"train.global_batch_size": {"randint": [64, 65]}}
    assert check_sweep(load_config(SWEEP, {"sweep.space": space, "sweep.scheduler": "none",
                                           "train.micro_batch_size": 8}))


def test_the_tracker_tune_saves_holds_no_credential_and_takes_its_uri_back_on_resume(tmp_path):
    """Tune pickles the run config, the sweep's MLflow callback with it, into the experiment's `tuner.pkl`:
    the callback kept the tracking URI whole, a database's password with it."""
    import ray.cloudpickle as pickle

    from openclaw.sweeps import parent_run
    uri, storage = "postgresql://mlflow:S3cretPw@db.example/mlflow", "s3://AKIA1:wJalrSecret@bucket/sweeps"
    cfg = load_config(SWEEP, {"tracking.uri": uri, "checkpoint.storage": str(tmp_path)})
    saved = pickle.dumps(parent_run.SweepTracker(cfg, uri, "1", "p" * 32, storage))
    assert b"S3cretPw" not in saved and b"wJalrSecret" not in saved and b"db.example" in saved
    parent_run._FULL_URIS.clear()  # another driver: `--resume`
    restored = pickle.loads(saved)
    assert (restored.uri, restored.storage) == ("postgresql://db.example/mlflow", "s3://bucket/sweeps")
    parent_run.remember_uri(uri)
    parent_run.remember_uri(storage)
    assert (pickle.loads(saved).uri, pickle.loads(saved).storage) == (uri, storage)


def test_the_best_trial_is_written_again_after_a_write_that_failed(tmp_path, monkeypatch, capsys):
    """The tracker noted the best trial before writing it: one MLflow error while its tags were set, and
    the next update saw the same best and wrote nothing, so the parent ended with no best trial."""
    import types

    from mlflow.tracking import MlflowClient

    from conftest import sqlite_store
    from openclaw.sweeps.parent_run import SweepTracker
    uri = sqlite_store(tmp_path / "m.db")
    cfg = load_config(SWEEP, {"tracking.uri": uri, "checkpoint.storage": str(tmp_path), "sweep.metric": "val/accuracy",
                              "sweep.mode": "max", "sweep.scheduler": "none"})
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment).info.run_id
    tracker = SweepTracker(cfg, uri, experiment, parent, str(tmp_path))

    def trial(tid, value, lr):
        return types.SimpleNamespace(trial_id=tid, status="TERMINATED", config={"train.optimizer.lr": lr},
                                     last_result={"step": cfg.train.max_steps, "val/accuracy": value})
    real, failed = MlflowClient.set_tag, []

    def set_tag(self, run_id, key, value, *args, **kwargs):
        if key == "best.trial" and not failed:
            failed.append(value)
            raise ConnectionError("the tracking server hiccuped")
        return real(self, run_id, key, value, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "set_tag", set_tag)
    first, second = trial("t_00000", 0.8, 1e-3), trial("t_00001", 0.6, 1e-2)
    tracker.update_parent([first], completing=first)
    assert failed == ["t_00000"] and "could not update the sweep's MLflow run" in capsys.readouterr().err
    tracker.update_parent([first, second], completing=second)
    tags = client.get_run(parent).data.tags
    assert (tags.get("best.trial"), tags.get("best.params")) == ("t_00000", '{"train.optimizer.lr": 0.001}')
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent)}


def test_a_relative_store_and_cache_folders_are_the_drivers_not_each_trials(tmp_path, monkeypatch):
    """Tune runs each trial in a folder of its own: `tracking.uri: sqlite:///mlflow.db` opened every child
    run in a store of that trial's (the parent found none of its children), and a relative
    `data.cache.dir` was a cache per trial, each preparing the data again."""
    from openclaw.sweeps.launch import _absolute_paths, _absolute_store
    monkeypatch.chdir(tmp_path)
    assert _absolute_store("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    for kept in ("sqlite:////abs/m.db", "http://127.0.0.1:5000", "postgresql://db/mlflow"):
        assert _absolute_store(kept) == kept
    raw = load_config(SWEEP, {"data.cache.dir": "cache", "data.shard_cache.dir": "~/shards",
                              "data.train": "datasets/digits/train"}).resolved()
    paths = _absolute_paths(raw, str(tmp_path / "runs"))["data"]
    assert (paths["cache"]["dir"], paths["shard_cache"]["dir"], paths["train"]) == (
        str(tmp_path / "cache"), os.path.expanduser("~/shards"), str(tmp_path / "datasets/digits/train"))
