"""`ray job submit` against a real `ray start --head` cluster on loopback, with token auth on, where
openclaw is NOT importable on the cluster: the package travels with the job's working dir."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

HIDE_INSTALLED = """\
import os, sys
hide = os.path.realpath(os.environ["OPENCLAW_TEST_HIDE_PATH"])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != hide]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A real head node on 127.0.0.1 whose processes cannot import the installed openclaw: (the job
    server's address, the environment to reach it with)."""
    dash, _, env, temp_dir = _start_head(tmp_path, hide_openclaw=True)
    try:
        yield dash, env
    finally:
        _kill_cluster(temp_dir)


@pytest.fixture
def plain_head(tmp_path):
    """A real head node on 127.0.0.1 where openclaw is installed, as on a cluster built from its image:
    (the GCS address a driver joins, the environment to reach it with)."""
    _, gcs, env, temp_dir = _start_head(tmp_path, hide_openclaw=False)
    try:
        yield gcs, env
    finally:
        _kill_cluster(temp_dir)


def _start_head(tmp_path, hide_openclaw: bool) -> tuple[str, str, dict, str]:
    temp_dir = f"/tmp/oc-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # `ray job stop` SIGKILLs a job still running this long after its SIGTERM (Ray's default: 3 s).
           # The stop's checkpoint, report and MLflow close take about that on a loaded 2-core machine.
           "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    env.pop("RAY_ADDRESS", None)
    if hide_openclaw:
        hide_dir = tmp_path / "hide"
        hide_dir.mkdir()
        (hide_dir / "sitecustomize.py").write_text(HIDE_INSTALLED)
        env.update(PYTHONPATH=str(hide_dir), OPENCLAW_TEST_HIDE_PATH=str(REPO / "platform"))
        probe = subprocess.run([sys.executable, "-c", "import openclaw"], env=env, capture_output=True)
        assert probe.returncode != 0, "the test cannot hide the installed openclaw"
    for attempt in range(2):  # a start on a loaded 2-core machine can fail; retry once on fresh ports
        dash, gcs = _free_port(), _free_port()
        r = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                            "--num-cpus=6",
                            # fresh ports: agents of an earlier cluster on this machine may still hold the defaults
                            f"--dashboard-agent-listen-port={_free_port()}",
                            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                            f"--metrics-export-port={_free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            break
        _kill_cluster(temp_dir)
    assert r.returncode == 0, f"ray start --head failed twice:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env, temp_dir


def _kill_cluster(temp_dir: str) -> None:
    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs + [c for p in procs for c in _children(p)]:
        try:
            p.kill()
        except psutil.Error:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def _children(p):
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _submit(cmd, env, ready_within_s=90):
    """Submit; a head that has only just started may not have its job agent up yet, and says so."""
    deadline = time.monotonic() + ready_within_s
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(1)


def _digits_job(address: str, digits_dir, tmp_path, uri: str, **overrides) -> list[str]:
    """`ray job submit` of the digits example, its working dir a copy of `jobs/` and `platform/` (the package
    travels with the job), its data, checkpoints and MLflow store in the test's folders."""
    work = tmp_path / "job"
    for part in ("jobs", "platform"):
        shutil.copytree(REPO / part, work / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(work), "--",
           "python", "jobs/train.py", "jobs/configs/digits.yaml"]
    base = {"data.train": digits_dir / "train", "data.val": digits_dir / "val", "tracking.uri": uri,
            "checkpoint.storage": tmp_path / "runs"}
    for k, v in {**base, **overrides}.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def test_ray_job_submit_trains_without_openclaw_installed(head, digits_dir, tmp_path):
    address, env = head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _digits_job(address, digits_dir, tmp_path, uri, **{"train.max_steps": 60, "train.eval_every": 0,
                                                            "checkpoint.every_steps": 30, "name": "submitted"})
    r = _submit(cmd, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "step 60/60" in r.stdout
    run_id = next(line.split()[-1] for line in r.stdout.splitlines() if "MLflow run id:" in line)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val/accuracy"] > 0.5
    job = json.loads((tmp_path / "runs" / "submitted" / "openclaw_job.json").read_text())
    assert job["mlflow_run_id"] == run_id


def test_submit_without_token_is_refused(head):
    address, env = head
    job_list = [str(BIN / "ray"), "job", "list", "--address", address]
    # Without the cluster's token the job server answers 401, which Ray's client raises as its
    # AuthenticationError (a traceback: Ray's own CLI, not openclaw's).
    r = subprocess.run(job_list, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in r.stderr, \
        r.stderr[-3000:]
    # The same request with the token (RAY_AUTH_MODE=token, the token `ray start` wrote) is answered.
    ok = subprocess.run(job_list, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert f"Job submission server address: {address}" in _plain(ok.stdout) and "Authentication" not in ok.stderr


def _plain(text: str) -> str:
    """Ray's CLI output without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_the_cli_joins_a_running_cluster_with_address_and_verbose_shows_its_workers_logs(plain_head, digits_dir,
                                                                                         tmp_path):
    gcs, env = plain_head
    cmd = [str(BIN / "openclaw"), "train", str(REPO / "jobs" / "configs" / "digits.yaml"), "--address", gcs,
           "--set", f"data.train={digits_dir / 'train'}", "--set", f"data.val={digits_dir / 'val'}",
           "--set", f"checkpoint.storage={tmp_path / 'runs'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
           "--set", "train.max_steps=20", "--set", "train.eval_every=0"]
    quiet = subprocess.run(cmd + ["--set", "name=quiet"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    loud = subprocess.run(cmd + ["--set", "name=loud", "--verbose"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    for r in (quiet, loud):
        assert r.returncode == 0 and "step 20/20" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    said = {name: _plain(r.stdout + r.stderr) for name, r in (("quiet", quiet), ("loud", loud))}
    # Both joined the running cluster; neither started an instance of its own.
    assert all("Started a local Ray instance" not in out for out in said.values())
    port = gcs.rsplit(":", 1)[1]  # Ray names the host by the node's address
    assert re.search(rf"Connecting to existing Ray cluster at address: [0-9.]+:{port}\.\.\.", said["loud"])
    # --verbose streams the controller's and the workers' logs to the console; without it, none.
    assert "(RayTrainWorker pid=" in said["loud"] and "(TrainController pid=" in said["loud"]
    assert "(RayTrainWorker pid=" not in said["quiet"] and "(TrainController pid=" not in said["quiet"]
    # openclaw's drain watcher starts without actor handles in its arguments: no Ray error line about them.
    assert "has constructor arguments in the object store" not in said["loud"]


def test_ray_job_stop_checkpoints_at_the_next_step_and_the_same_submit_resumes(head, digits_dir, tmp_path):
    """`ray job stop` sends SIGTERM, and SIGKILL if the job has not ended within the head's
    `RAY_JOB_STOP_WAIT_TIME_S` (30 s on this head: Ray's 3 s default is about what the stop takes here)."""
    address, env = head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _digits_job(address, digits_dir, tmp_path, uri, **{"train.max_steps": 4000, "train.eval_every": 0,
                                                            "train.log_every": 100, "checkpoint.every_steps": 5000,
                                                            "name": "stopped"})
    first = _submit(cmd[:3] + ["--no-wait"] + cmd[3:], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job = re.search(r"Job '(raysubmit_\w+)' submitted successfully", _plain(first.stdout)).group(1)
    logs = [str(BIN / "ray"), "job", "logs", "--address", address, job]
    deadline = time.monotonic() + 300
    while not re.search(r"step +[3-9]\d\d/4000", subprocess.run(logs, env=env, capture_output=True, text=True).stdout):
        assert time.monotonic() < deadline, "the job trained no 300 steps in 300 s"
        time.sleep(0.5)
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout[-3000:] + stop.stderr[-3000:]
    out = _plain(subprocess.run(logs, env=env, capture_output=True, text=True).stdout)
    assert "SIGTERM: checkpointing at the next step" in out, out[-3000:]
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 300 <= stopped < 4000, out[-3000:]
    run_id = re.search(r"MLflow run (\w+) ", out).group(1)
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    again = _submit(cmd, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resume at step {stopped}/4000" in again.stdout and "step 4000/4000" in again.stdout
    assert f"MLflow run id: {run_id}" in again.stdout  # the same run, continued
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
