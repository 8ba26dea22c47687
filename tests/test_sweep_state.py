"""Tune's saved state of a sweep, checked before `--resume`: a state file a killed driver left cut short
is moved aside when an earlier one reads whole, and is otherwise a clear error (Tune alone would log
the failure and start the sweep over). Real files, written as Tune writes them."""
import json

import pytest

from openclaw.errors import CheckpointError
from openclaw.sweeps.saved_state import check_saved_state

WHOLE = json.dumps({"trial_data": [["{}", "{}"]], "runner_data": {}, "stats": {"start_time": 0}})


def _states(folder, **files):
    folder.mkdir(exist_ok=True)
    for stamp, text in files.items():
        (folder / f"experiment_state-{stamp}.json").write_text(text)
    (folder / "tuner.pkl").write_bytes(b"not read here")


def test_a_cut_short_newest_state_is_moved_aside_and_the_earlier_one_resumes(tmp_path):
    _states(tmp_path, **{"2026-12-05_10-00-00": WHOLE, "2026-12-05_11-00-00": WHOLE[:40],
                         "2026-12-05_12-00-00": ""})
    said = check_saved_state(str(tmp_path), "sw")
    assert "experiment_state-2026-12-05_12-00-00.json.incomplete" in said
    assert "resuming from experiment_state-2026-12-05_10-00-00.json" in said
    # What Tune reads next: the newest by name, which is now the whole one; the cut ones are kept.
    assert sorted(p.name for p in tmp_path.glob("experiment_state-*.json")) == ["experiment_state-2026-12-05_10-00-00.json"]
    assert (tmp_path / "experiment_state-2026-12-05_11-00-00.json.incomplete").read_text() == WHOLE[:40]
    assert check_saved_state(str(tmp_path), "sw") is None  # nothing more to do


def test_whole_states_are_left_as_they_are(tmp_path):
    _states(tmp_path, **{"2026-12-05_10-00-00": WHOLE, "2026-12-05_11-00-00": WHOLE})
    assert check_saved_state(str(tmp_path), "sw") is None
    assert len(list(tmp_path.glob("experiment_state-*.json"))) == 2


@pytest.mark.parametrize("text", ["", WHOLE[:-1], json.dumps({"trial_data": []})])
def test_no_state_that_reads_whole_is_a_clear_error(tmp_path, text):
    _states(tmp_path, **{"2026-12-05_10-00-00": text})
    with pytest.raises(CheckpointError, match=r"Tune's saved state of sweep 'sw' \(experiment_state-2026-12-05_"
                                              r"10-00-00.json in .*\) is incomplete: .* start the sweep again under "
                                              r"another `name`"):
        check_saved_state(str(tmp_path), "sw")
    assert (tmp_path / "experiment_state-2026-12-05_10-00-00.json").read_text() == text  # not moved: nothing else to read


def test_the_killed_drivers_searcher_and_callback_states_go_aside_with_its_experiment_state(tmp_path):
    """Only the experiment state was moved aside; Tune restores the newest searcher state on its own, so the
    resumed sweep took the killed driver's, which counted trials the older experiment state never knew as
    running for ever (with `max_concurrent` reached, no trial was made again)."""
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    def generator():
        made = BasicVariantGenerator(random_state=0, max_concurrent=2)
        made.add_configurations([Experiment("s", lambda c: None, config={"lr": tune.loguniform(1e-4, 1e-2)},
                                            num_samples=6, storage_path=str(tmp_path))])
        return made
    first = generator()
    for trial in [first.next_trial(), first.next_trial()]:
        first.on_trial_complete(trial.trial_id)
    first.save_to_dir(str(tmp_path), "2026-12-05_10-00-00")
    killed = generator()
    killed.restore_from_dir(str(tmp_path))
    killed.next_trial(), killed.next_trial()  # running when the driver was killed mid-save
    killed.save_to_dir(str(tmp_path), "2026-12-05_11-00-00")
    (tmp_path / "callback-states-2026-12-05_11-00-00.pkl").write_bytes(b"the killed driver's")
    _states(tmp_path, **{"2026-12-05_10-00-00": WHOLE, "2026-12-05_11-00-00": WHOLE[:40]})
    assert "resuming from experiment_state-2026-12-05_10-00-00.json" in check_saved_state(str(tmp_path), "sw")
    assert sorted(p.name for p in tmp_path.iterdir() if "11-00-00" in p.name) == [
        "basic-variant-state-2026-12-05_11-00-00.json.incomplete", "callback-states-2026-12-05_11-00-00.pkl.incomplete",
        "experiment_state-2026-12-05_11-00-00.json.incomplete"]
    resumed = generator()  # what Tune restores now: the first driver's searcher, which makes the next trial
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.next_trial() is not None


def test_a_resume_whose_sweep_section_changed_is_refused_naming_what_changed(tmp_path):
    """Tune restores its search as it started: a resume with `num_samples: 12` for 6 printed 12 trials and
    ran 6, and another `metric` named a best trial with no value (the CLI then failed on it)."""
    import pytest

    from openclaw.errors import ConfigError
    from openclaw.sweeps.saved_state import check_same_sweep, keep_sweep_section
    exp = str(tmp_path / "sweeps" / "sw")
    check_same_sweep(exp, {"num_samples": 6})  # a sweep from before the note: not compared
    started = {"metric": "val/loss", "num_samples": 6, "space": {"train.optimizer.lr": {"loguniform": (1e-4, 1e-2)}}}
    keep_sweep_section(exp, started)
    check_same_sweep(exp, started)
    with pytest.raises(ConfigError, match=r"changed since: sweep.metric 'val/loss' -> 'train/loss', "
                                          r"sweep.num_samples 6 -> 12\. Put it back"):
        check_same_sweep(exp, {**started, "metric": "train/loss", "num_samples": 12})
    check_same_sweep(exp, {**started, "a_key_a_later_version_adds": 1})  # not a change
    with pytest.raises(ConfigError, match=r"changed since: sweep.space .*'model.kwargs.hidden'"):  # a key tuned more
        check_same_sweep(exp, {**started, "space": {**started["space"], "model.kwargs.hidden": {"choice": [64, 128]}}})
