"""Sweeps on a real local Ray instance with Ray Tune: trials are whole openclaw runs, nested under one
MLflow parent run; ASHA stops laggards; a sweep whose driver was killed resumes without rerunning the
trials that had finished. And what people see of them in the MLflow UI, in headless Chromium."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO, MlflowServer, sqlite_store
from openclaw.cli import ui_hint

pytestmark = pytest.mark.integration
SWEEP = REPO / "jobs" / "configs" / "digits-sweep.yaml"


def sweep_overrides(digits_dir, tmp_path, uri, **more) -> dict:
    return {"data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "val"),
            "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": uri, **more}


def children(client: MlflowClient, parent) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def asha_sweep(ray_local, digits_dir, tmp_path_factory):
    """One ASHA sweep for this module's tests: (result, tracking URI, its folder)."""
    tmp_path = tmp_path_factory.mktemp("asha")
    mlflow_uri = sqlite_store(tmp_path / "mlflow.db")
    # A grid of a hopeless and a good learning rate, each with 3 warmups (Tune's grid varies the first key
    # in sorted order fastest, so they alternate): ASHA must cut the hopeless ones once it has seen a
    # good one at the same step. 300 steps: a trial trains on while Tune decides at its rung (ASHA is
    # asynchronous), and the margin keeps a hopeless one from finishing before the stop reaches it.
    cfg = openclaw.load_config(SWEEP, sweep_overrides(digits_dir, tmp_path, mlflow_uri, **{
        "train.max_steps": 300, "sweep.search": "grid", "sweep.num_samples": 1, "sweep.max_concurrent": 2,
        "sweep.asha.grace_period_steps": 50, "sweep.space": {"train.optimizer.lr": {"choice": [1e-5, 3e-3]},
                                                             "train.schedule.warmup_steps": {"choice": [5, 10, 20]}}}))
    return openclaw.sweep(cfg), mlflow_uri, tmp_path


def test_asha_sweep_of_six_trials_two_at_a_time_nests_them_under_one_parent_with_the_best(asha_sweep):
    result, mlflow_uri, tmp_path = asha_sweep

    client = MlflowClient(mlflow_uri)
    kids = children(client, result.parent_run_id)
    assert len(kids) == 6 == len(result.trials)
    by_outcome = {o: [k for k in kids if k.data.tags.get("openclaw.outcome", "finished") == o]
                  for o in ("finished", "stopped_early")}
    assert len(by_outcome["finished"]) + len(by_outcome["stopped_early"]) == 6
    # Every hopeless trial that reached step 50 after a good one had is cut there (the grid's 3rd and 5th).
    hopeless = [k for k in by_outcome["stopped_early"] if float(k.data.params["train.optimizer.lr"]) == 1e-5]
    assert len(hopeless) >= 2, [(t["outcome"], t["train.optimizer.lr"]) for t in result.trials]
    curves = {k.info.run_id: dict(history(client, k.info.run_id, "val/loss")) for k in kids}
    for k in by_outcome["stopped_early"]:  # recorded as stopped early, not failed, with every metric flushed
        assert k.info.status == "KILLED" and "Stopped early by the sweep's ASHA" in k.data.tags["mlflow.note.content"]
        row = next(t for t in result.trials if t["trial"] and k.data.tags["openclaw.name"].endswith(t["trial"]))
        mine = curves[k.info.run_id]  # evaluations every 50 steps, up to its stop checkpoint's step
        assert sorted(mine) == list(range(50, max(mine) + 1, 50)) and max(mine) <= row["step"] < 300
        # ASHA cut it because it trailed: another trial did better at a step both evaluated.
        assert any(c.get(s, float("inf")) < v for c in curves.values() for s, v in mine.items())
    for k in by_outcome["finished"]:
        assert k.info.status == "FINISHED" and [s for s, _ in history(client, k.info.run_id, "val/loss")][-1] == 300

    # Stopped trials shut their workers down: every CPU is free again (Tune killing a trial's actor left
    # its worker group's placement group behind, starving the tests after it).
    import ray
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]

    # At most 2 trials ran at once: no child run started while two others were open.
    spans = sorted((k.info.start_time, k.info.end_time) for k in kids)
    assert all(sum(s <= start < e for s, e in spans) <= 2 for start, _ in spans)

    # The parent: the best trial's run, metric and params, and a table of every trial.
    parent = client.get_run(result.parent_run_id)
    finals = {k.info.run_id: k.data.metrics["val/loss"] for k in by_outcome["finished"]}
    assert parent.data.tags["best.run_id"] == min(finals, key=finals.get) == result.best_run_id
    assert parent.data.metrics["best/val/loss"] == pytest.approx(min(finals.values()))
    best_params = json.loads(parent.data.tags["best.params"])
    assert best_params["train.optimizer.lr"] == 3e-3 and len(set(finals.values())) == len(finals)  # warmups differ
    assert best_params["train.schedule.warmup_steps"] == int(
        client.get_run(result.best_run_id).data.params["train.schedule.warmup_steps"])
    assert parent.info.status == "FINISHED" and parent.data.tags["openclaw.kind"] == "sweep"
    assert f"Best: trial {parent.data.tags['best.trial']}" in parent.data.tags["mlflow.note.content"]
    table = json.load(open(client.download_artifacts(result.parent_run_id, "trials.json", str(tmp_path))))
    assert len(table["data"]) == 6 and "outcome" in table["columns"]
    best_cfg = openclaw.load_config(client.download_artifacts(result.parent_run_id, "best_config.yaml", str(tmp_path)))
    assert best_cfg.train.optimizer.lr == 3e-3 and best_cfg.sweep is None


def test_the_parent_run_is_not_a_model_and_advise_and_export_name_the_best_trial_instead(asha_sweep, capsys):
    from openclaw.cli import main
    result, mlflow_uri, _ = asha_sweep
    for command, verb in ((["advise"], "advise"), (["export", "--quantize", "int8"], "pass")):
        assert main([*command, result.parent_run_id, "--tracking-uri", mlflow_uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"openclaw: error: MLflow run {result.parent_run_id} is sweep "), err
        assert f"parent run, which trains no model: {verb} a trial's run instead, e.g. the best one, " \
               f"{result.best_run_id}." in err and "Traceback" not in err, err


@pytest.mark.parametrize("tune_saved_it", [True, False], ids=["tune-saved-it-finished", "trial-finds-its-record"])
def test_a_resumed_sweep_reruns_no_finished_trial(digits_dir, tmp_path, tune_saved_it):
    """The first driver is killed once a trial has finished; `--resume` must not train it again. Two paths,
    each forced: Tune's saved state already says the trial finished, so Tune does not start it again; or
    Tune last saved it before it finished, starts it again, and the trial finds its finished record in
    its job file and reports that record without training (`sweeps.trial.run_trial`)."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    # Data paths relative to the driver's working folder (the trials run in Tune's trial folders).
    cmd = [sys.executable, "-m", "openclaw.cli", "sweep", str(SWEEP)] + [
        f"--set={k}={v}" for k, v in sweep_overrides(digits_dir, tmp_path, uri, **{
            "data.train": os.path.relpath(digits_dir / "train", tmp_path),
            "data.val": os.path.relpath(digits_dir / "val", tmp_path),
            "train.max_steps": 100, "sweep.num_samples": 2, "sweep.max_concurrent": 1,
            "sweep.scheduler": "none"}).items()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not tune_saved_it:  # Tune saves its state when it starts, then not for a day (openclaw's period is 2 s)
        env["TUNE_GLOBAL_CHECKPOINT_S"] = "86400"
    experiment = tmp_path / "runs" / "digits-sweep"
    # The first driver (with its own local Ray instance) is killed, all of it, once a trial has finished
    # (and, on the first path, once Tune's saved state says so).
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
                             start_new_session=True)
    finished = None
    for line in first.stdout:
        m = re.search(r"trial (\S+) finished at step 100", line)
        if m:
            finished = m.group(1)
            break
    if finished and tune_saved_it:
        deadline = time.monotonic() + 60
        while tune_saved_status(experiment).get(finished) != "TERMINATED" and time.monotonic() < deadline:
            time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert finished, "no trial finished before the first driver ended"
    saved = tune_saved_status(experiment)
    assert finished in saved and (saved[finished] == "TERMINATED") == tune_saved_it, saved

    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("openclaw").experiment_id],
                                filter_string="tags.`openclaw.kind` = 'sweep'")[0].info.run_id
    done = next(k for k in children(client, parent) if k.data.tags["openclaw.name"].endswith(finished))
    before = (done.info.end_time, history(client, done.info.run_id, "train/loss"))

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "sweep done: 2 finished, 0 stopped early, 0 failed" in second.stdout
    # Without --verbose, openclaw's lines alone: not Tune's banner, folder or TensorBoard command.
    assert not re.search(r"Configuration for experiment|View detailed results here|tensorboard", second.stdout), \
        second.stdout[-3000:]
    started_again = f"trial {finished} started" in second.stdout
    reported = (f"trial {finished} had finished before the sweep's driver stopped (not run again); it ended at "
                f"step 100") in second.stdout
    assert (started_again, reported) == (not tune_saved_it, not tune_saved_it), second.stdout[-3000:]

    kids = children(client, parent)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)  # no trial ran as a second child run
    again = client.get_run(done.info.run_id)
    assert (again.info.end_time, history(client, done.info.run_id, "train/loss")) == before
    events = json.load(open(client.download_artifacts(done.info.run_id, "events.json", str(tmp_path))))
    assert [e["event"] for e in events if e["event"] in ("start", "resume", "restart", "resize")] == ["start"]
    assert client.get_run(parent).info.status == "FINISHED"


def _stop_after_a_trial(proc: subprocess.Popen, sig: int, skip: set[str]) -> tuple[str, list[str]]:
    """Send `sig` once a trial not in `skip` has finished: a terminal's Ctrl-C to the driver's process
    group, a SIGTERM (`kill`, `ray job stop`) to the driver. Returns that trial and the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if (m := re.search(r"trial (\S+) finished at step 100", line)) and m.group(1) not in skip:
            os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
            return m.group(1), lines
    raise AssertionError("".join(lines)[-3000:])


def test_sigterm_or_ctrl_c_stops_the_sweep_killed_and_resume_finishes_it_without_rerunning_a_finished_trial(
        digits_dir, tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    cmd = [sys.executable, "-m", "openclaw.cli", "sweep", str(SWEEP)] + [
        f"--set={k}={v}" for k, v in sweep_overrides(digits_dir, tmp_path, uri, **{
            "train.max_steps": 100, "sweep.num_samples": 3, "sweep.max_concurrent": 1,
            "sweep.scheduler": "none"}).items()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    client = MlflowClient(uri)

    def runs() -> tuple[str, dict[str, Any]]:
        parent = client.search_runs([client.get_experiment_by_name("openclaw").experiment_id],
                                    filter_string="tags.`openclaw.kind` = 'sweep'")[0].info.run_id
        return parent, {k.data.tags["openclaw.name"].rsplit("-", 1)[1]: k for k in children(client, parent)}

    # SIGTERM, as `ray job stop` sends it, then SIGKILL once the runs are marked, as it sends 3 s later:
    # nothing is left RUNNING in MLflow, though the driver never got to the end of Tune's stop.
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
                             start_new_session=True)
    a, lines = _stop_after_a_trial(first, signal.SIGTERM, set())
    for line in first.stdout:
        lines.append(line)
        if "the sweep's MLflow runs are marked KILLED" in line:
            os.killpg(first.pid, signal.SIGKILL)
            break
    out = "".join(lines) + first.communicate(timeout=60)[0]
    assert first.returncode == -signal.SIGKILL and "SIGTERM: stopping the sweep" in out, out[-3000:]
    parent, kids = runs()
    assert client.get_run(parent).info.status == "KILLED" and kids[a].info.status == "FINISHED"
    assert all(k.info.status == "KILLED" for name, k in kids.items() if name != a), kids  # none left RUNNING
    before = (kids[a].info.end_time, history(client, kids[a].info.run_id, "train/loss"))

    # Resumed, then Ctrl-C (to the process group, as a terminal sends it) once another trial finished.
    second = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path, env=env, start_new_session=True)
    b, lines = _stop_after_a_trial(second, signal.SIGINT, {a})
    out = "".join(lines) + second.communicate(timeout=300)[0]
    assert second.returncode == 130, out[-3000:]
    assert "Ctrl-C: stopping the sweep" in out and "interrupted with 2 of its 3 trial(s) finished" in out
    assert "--resume" in out and not re.search(r"Tuner.restore|Traceback|sweep done", out), out[-3000:]
    _, kids = runs()
    assert client.get_run(parent).info.status == "KILLED" and {kids[a].info.status, kids[b].info.status} == {"FINISHED"}
    assert all(k.info.status == "KILLED" for name, k in kids.items() if name not in (a, b)), kids

    third = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "sweep done: 3 finished, 0 stopped early, 0 failed" in third.stdout
    assert f"trial {b} started" not in third.stdout  # Tune saved it finished at the Ctrl-C
    again = client.get_run(kids[a].info.run_id)  # trained once, whichever way the resumes kept it finished
    assert (again.info.end_time, history(client, again.info.run_id, "train/loss")) == before
    assert client.get_run(parent).info.status == "FINISHED"
    assert all(k.info.status == "FINISHED" for k in children(client, parent)) and len(runs()[1]) == 3


def tune_saved_status(experiment: Path) -> dict[str, str]:
    """Each trial's status in the newest experiment state Tune saved in `experiment` (what `--resume` reads)."""
    states = sorted(experiment.glob("experiment_state-*.json"))  # named by the driver's start time
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except ValueError:  # being copied there right now: the next poll reads it whole
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _ in trials)}


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SECTION = re.compile(r'white-space: pre;">([^<]+)</div><div[^>]*>\((\d+)\)')  # a chart section: name (count)


def browse(url: str, screenshot: Path, profile: Path) -> str:
    """What headless Chromium shows at `url` once its scripts have run: the DOM, and a screenshot."""
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1100",
             "--virtual-time-budget=20000", f"--user-data-dir={profile}"]  # a fresh profile: MLflow's defaults
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


def test_the_mlflow_ui_opens_the_printed_links_in_the_model_training_view_with_grouped_charts_and_children(
        asha_sweep, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make install-test` installs it"
    result, _, root = asha_sweep
    server = MlflowServer(root)  # the sweep's own store, served by a real `mlflow server`
    server.start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        # The link the CLI prints for the sweep's parent run, pointed at this server.
        link = ui_hint(f"sqlite:///{root / 'mlflow.db'}", result.experiment_id, result.parent_run_id)
        fragment = link.split("http://127.0.0.1:5000/")[1]
        parent = browse(f"{server.uri}/{fragment}", shots / "parent.png", tmp_path / "p1")
        assert "Model registry" in parent and "Evaluation runs" not in parent  # the model-training view ...
        plain = browse(f"{server.uri}/{fragment.split('?')[0]}", shots / "plain.png", tmp_path / "p2")
        assert "Evaluation runs" in plain  # ... which MLflow 3.17 opens only with the query openclaw adds

        # The parent lists its 6 children.
        assert "Child runs" in parent
        assert all(f"digits-sweep-{t['trial']}" in parent for t in result.trials)

        # A trial's charts, grouped by prefix: train/, val/, perf/ on the model-metrics tab, system/ on its own.
        run = f"{server.uri}/#/experiments/{result.experiment_id}/runs/{result.best_run_id}"
        model = dict(SECTION.findall(browse(f"{run}/model-metrics?workflowType=machine_learning",
                                            shots / "model-metrics.png", tmp_path / "p3")))
        assert int(model["train"]) >= 5 and int(model["val"]) == 2 and int(model["perf"]) >= 5, model
        system = dict(SECTION.findall(browse(f"{run}/system-metrics?workflowType=machine_learning",
                                             shots / "system-metrics.png", tmp_path / "p4")))
        assert int(system["system/node0"]) >= 3, system
        print(f"MLflow UI screenshots: {shots}")
    finally:
        server.stop()
