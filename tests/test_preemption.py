"""Graceful stops: SIGTERM to a training worker, and to the driver of `openclaw train`. Real Ray, real
signals. The run checkpoints at the very next step, so no step is lost, and resumes from that step."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO, digits_config, newest_logged_step

pytestmark = pytest.mark.integration


def _events(uri, run_id, tmp_path):
    return json.load(open(MlflowClient(uri).download_artifacts(run_id, "events.json", str(tmp_path))))


def test_sigterm_to_a_worker_checkpoints_at_once_and_resumes_from_that_step(ray_local, digits_dir, tmp_path,
                                                                            mlflow_uri):
    # No failure budget at all: a preemption has its own (`failure.max_preemptions`, unlimited by default).
    common = {"train.max_steps": 600, "checkpoint.every_steps": 200, "train.log_every": 10, "train.eval_every": 0,
              "train.record_samples": True, "failure.max_failures": 0}
    clean = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="clean", **common))
    run_dir = tmp_path / "runs" / "termed"
    sent: list[int] = []

    def sigterm_a_worker_mid_interval():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not sent:
            for p in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and newest_logged_step(run_dir, p.pid) >= 250:
                    os.kill(p.pid, signal.SIGTERM)
                    sent.append(newest_logged_step(run_dir, p.pid))
                    break
            time.sleep(0.005)

    killer = threading.Thread(target=sigterm_a_worker_mid_interval)
    killer.start()
    result = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="termed", **common))
    killer.join()
    assert sent and result.metrics["step"] == 600

    events = _events(mlflow_uri, result.run_id, tmp_path)
    preempted = [e for e in events if e["event"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["cause"] == "SIGTERM"
    stopped_at = preempted[0]["step"]
    # the next step after the handler ran (a signal reaches a Ray worker's Python a few ms late, and a step
    # of this model is ~3 ms: on a loaded machine that is tens of steps), off the 200-step grid
    assert sent[0] < stopped_at <= sent[0] + 100 and stopped_at % 200
    restart = [e for e in events if e["event"] == "restart"]
    assert [e["resumed_from_step"] for e in restart] == [stopped_at]  # zero steps lost
    assert stopped_at in {e["step"] for e in events if e["event"] == "checkpoint"}

    # The extra checkpoint changes nothing: the result is the uninterrupted run's, bit for bit.
    final, reference = openclaw.load_model(result.checkpoint), openclaw.load_model(clean.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))
    # One train/loss per logged step, each averaging the same steps as the uninterrupted run: the log
    # window open at the off-grid checkpoint was carried across the restart (only float64 sums reorder).
    loss = lambda run_id: {m.step: m.value for m in MlflowClient(mlflow_uri).get_metric_history(  # noqa: E731
        run_id, "train/loss")}
    got, want = loss(result.run_id), loss(clean.run_id)
    assert sorted(got) == list(range(10, 601, 10))
    assert all(abs(got[s] - want[s]) <= 1e-9 * want[s] for s in want), [(s, got[s], want[s]) for s in want
                                                                       if got[s] != want[s]]


def test_sigterm_or_ctrl_c_to_the_driver_checkpoints_stops_and_the_same_command_resumes(digits_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "openclaw.cli", "train", str(REPO / "jobs" / "configs" / "digits.yaml"),
           "--set", f"data.train={digits_dir / 'train'}", "--set", f"data.val={digits_dir / 'val'}",
           "--set", f"checkpoint.storage={tmp_path / 'runs'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
           "--set", "train.max_steps=1500", "--set", "checkpoint.every_steps=1000", "--set", "train.log_every=50",
           "--set", "train.eval_every=0", "--set", "name=driver-term"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 300:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "SIGTERM: checkpointing at the next step" in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 300 <= stopped < 1500 and stopped % 1000, out  # not a scheduled checkpoint: the stop's own
    assert "Traceback" not in out

    # The same command resumes there; Ctrl-C (SIGINT to its process group, as a terminal sends it) stops it
    # the same way, where Ray Train's own handler would abort the run and lose the steps since its checkpoint.
    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
                             start_new_session=True)
    lines = []
    for line in again.stdout:
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= stopped + 100:
            os.killpg(again.pid, signal.SIGINT)
            break
    out = "".join(lines) + again.communicate(timeout=300)[0]
    assert again.returncode == 130, out
    assert f"resume at step {stopped}/1500" in out and "Ctrl-C: checkpointing at the next step" in out
    interrupted = int(out.split("stopped at step ")[1].split()[0])
    assert stopped + 100 <= interrupted < 1500 and interrupted % 1000, out
    assert "Traceback" not in out

    # Another model cannot resume it: refused before anything starts, with what changed.
    other = subprocess.run(cmd + ["--set", "model.kwargs.hidden=64"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "`model.kwargs.hidden` was 128, now 64" in other.stderr and "Started a local Ray" not in other.stderr

    # Another learning rate can: the run says so and keeps the change in MLflow beside its first params.
    last = subprocess.run(cmd + ["--set", "train.optimizer.lr=0.002"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"resume at step {interrupted}/1500" in last.stdout
    assert "the config changed since " in last.stdout and "train.optimizer.lr 0.003 -> 0.002" in last.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = next(line.split()[-1] for line in last.stdout.splitlines() if "MLflow run id:" in line)
    [changes] = client.list_artifacts(run_id, "config_changes")
    recorded = json.load(open(client.download_artifacts(run_id, changes.path, str(tmp_path))))
    assert recorded["changes"] == {"train.optimizer.lr": {"before": 0.003, "after": 0.002}}
    assert client.get_run(run_id).data.params["train.optimizer.lr"] == "0.003"

    # Finished: the same command again says so and returns its result, starting nothing.
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"'driver-term' already finished at step 1500 (MLflow run {run_id}); nothing to train" in done.stdout
    assert f"MLflow run id: {run_id}" in done.stdout and "checkpoint: " + last.stdout.split("checkpoint: ")[1].split()[0] \
        in done.stdout
    assert "Started a local Ray" not in done.stderr and "resume at step" not in done.stdout


def block_in_preparation(batch):
    """A user transform (`data.transforms` map_batches) that, in Ray Data's preparing tasks (batches of
    more than the 64 rows the driver tries first), marks that preparation started and then blocks: the
    driver is preparing, before any worker or MLflow run exists, until a signal ends it."""
    if len(next(iter(batch.values()))) > 64:
        open(os.environ["OPENCLAW_TEST_PREPARING"], "w").close()
        threading.Event().wait(600)
    return batch


def test_sigterm_or_ctrl_c_before_training_or_twice_in_it_stops_at_once_and_closes_the_run(digits_dir, tmp_path):
    """Where no graceful stop can be made (preparing the data), or when asked a second time, the driver
    stops at once the way Ctrl-C always did: a message, exit 143 or 130, no traceback, its MLflow run
    KILLED, its Ray instance gone. Before, a SIGTERM there ended the process where it stood."""
    mark = tmp_path / "preparing"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OPENCLAW_TEST_PREPARING": str(mark)}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cmd = [sys.executable, "-m", "openclaw.cli", "train", str(REPO / "jobs" / "configs" / "digits.yaml"),
           "--set", f"data.train={digits_dir / 'train'}", "--set", f"data.val={digits_dir / 'val'}",
           "--set", f"checkpoint.storage={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}",
           "--set", "train.eval_every=0", "--set", "name=stop-at-once"]
    blocking = ["--set", 'data.transforms=[{"op": "map_batches", "fn": "tests.test_preemption:block_in_preparation"}]',
                "--set", f"data.cache.dir={tmp_path / 'cache'}"]
    for sig, code, name in [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")]:
        mark.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd + blocking, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), proc.communicate(timeout=60)[0]
        # Ray's processes (its local instance, the blocked task's worker) carry the driver's environment.
        rays = [p for p in psutil.process_iter(["environ"]) if p.pid != proc.pid and (p.info["environ"] or {}).get(
            "OPENCLAW_TEST_PREPARING") == str(mark)]
        assert len(rays) >= 3, rays
        # As `kill` or `ray job stop` sends SIGTERM (to the driver), and a terminal Ctrl-C (to its group).
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == code, out
        assert f"stopped at once by {name}. Run the same command again" in out and "Traceback" not in out, out
        assert not psutil.wait_procs(rays, timeout=60)[1]  # all ended with the driver

    # In training: the first SIGTERM asks for a checkpoint at the next step, a second stops at once. (No
    # log window before the end: `log_every` is past where it stops.)
    proc = subprocess.Popen(cmd + ["--set", "train.max_steps=100000", "--set", "train.log_every=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("openclaw: start at step 0/100000"):
            proc.send_signal(signal.SIGTERM)
        if "SIGTERM: checkpointing at the next step" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out
    assert "stopped at once by SIGTERM" in out and "Traceback" not in out, out
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("openclaw").experiment_id])
    assert run.info.status == "KILLED"

    # What it left cannot be exported or advised on, and each says why and what to pass instead.
    said = {c: subprocess.run([sys.executable, "-m", "openclaw.cli", *c.split(), run.info.run_id, "--tracking-uri", uri],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
            for c in ("export --quantize int8", "advise")}
    assert [r.returncode for r in said.values()] == [2, 2], said
    assert (f"MLflow run {run.info.run_id} is KILLED: it has not logged its final model. Pass its newest checkpoint "
            f"(a checkpoint_* folder in {tmp_path / 'runs' / 'stop-at-once'}), or run the same `openclaw train` command"
            ) in said["export --quantize int8"].stderr
    assert "logged no step-time window yet" in said["advise"].stderr


def test_ray_preemption_notice_reaches_a_restarted_group_and_is_answered_with_a_checkpoint(digits_dir, tmp_path):
    """A node drain (Ray's preemption notice) after a worker restart: the run's one drain watcher, in the
    controller's process and re-aimed at the new group, tells the workers, and they checkpoint at the next
    step and train on."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.2"}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "drain_cluster.py"), str(tmp_path), str(digits_dir)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["finished_step"] == 2500
    events = got["events"]
    assert [e["event"] for e in events if e["event"] in ("start", "restart")] == ["start", "restart"]
    answered = [e for e in events if e["event"] == "checkpoint_requested"]
    assert [e["cause"] for e in answered] == ["preemption notice"], answered
    noticed = answered[0]
    assert noticed["t"] > got["drained_at"] and noticed["t"] - got["drained_at"] < 15
    saved = {e["step"] for e in events if e["event"] == "checkpoint"}
    assert noticed["step"] in saved  # its own checkpoint (the cause above says it was asked for, not scheduled)
    # Four workers (two groups); no drain-watcher actor (the watcher is a thread of the controller) and no
    # Ray Data dataset manager.
    assert got["actors"]["RayTrainWorker"] == 4, got["actors"]
    assert not {"RunPreemptionWatcher", "PreemptionWatcher", "DatasetManager"} & set(got["actors"]), got["actors"]
