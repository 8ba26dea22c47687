"""No secret at rest: a sweep and a run train from a real S3-compatible server (moto) with a known secret,
in the config and in the environment, tracked on a real `mlflow server`; one run loses its server and
spools. Then every file they wrote (checkpoints, prepared data, Tune's state, the MLflow database and
artifact store, the spool), the drivers' stdout and stderr, and what Ray's state API shows of the
job's actors and runtime envs are searched for the secret."""
import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, MlflowServer, S3Server

pytestmark = pytest.mark.integration

DRIVER = r"""
import json, sys, threading, time
from pathlib import Path
import ray
import openclaw

spec = json.loads(Path(sys.argv[1]).read_text())
ray.init(address="local", num_cpus=8, include_dashboard=True, log_to_driver=False)
common = spec["common"]
sweep = openclaw.load_config(spec["repo"] + "/jobs/configs/digits-sweep.yaml", {**common, "name": "secret-sweep",
    "sweep.search": "grid", "sweep.num_samples": 1, "sweep.max_concurrent": 1, "sweep.scheduler": "none",
    "sweep.space": {"train.optimizer.lr": {"choice": [3e-3]}}})
openclaw.sweep(sweep)

def kill_the_server():  # the second run loses its server after its first checkpoint: it spools
    run_dir = Path(common["checkpoint.storage"]) / "secret-spooled"
    while not list(run_dir.glob("checkpoint_*/manifest.json")):
        time.sleep(0.05)
    import os, signal
    os.killpg(spec["server_pid"], signal.SIGKILL)

threading.Thread(target=kill_the_server, daemon=True).start()
cfg = openclaw.load_config(spec["repo"] + "/jobs/configs/digits.yaml", {**common, "name": "secret-spooled",
    "tracking.flush_timeout_s": 1, "train.max_steps": 60})
openclaw.train(cfg)

from ray.util.state import list_actors, list_jobs, list_runtime_envs
here = ray.get_runtime_context().gcs_address  # this instance, whatever other Ray instances the machine runs
state = {"actors": [str(a) for a in list_actors(address=here, detail=True, limit=10000)],
         "runtime_envs": [str(e) for e in list_runtime_envs(address=here, detail=True)],
         "jobs": [str(j) for j in list_jobs(address=here)]}
Path(spec["state_dump"]).write_text(json.dumps(state))
"""


def test_no_secret_is_written_printed_or_shown(digits_dir, tmp_path):
    secret, token, key_id = f"oc-s3cr3t-{uuid.uuid4().hex}", f"oc-t0ken-{uuid.uuid4().hex}", "AKIAOPENCLAWTEST0001"
    s3 = S3Server().start()
    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    server.start()
    try:
        train = s3.upload(digits_dir / "train", "bkt/digits/train")
        val = s3.upload(digits_dir / "val", "bkt/digits/val")
        common = {"data.train": train, "data.val": val, "data.s3.endpoint_url": s3.endpoint,
                  "data.s3.access_key_id": key_id, "data.s3.secret_access_key": secret, "data.on_bad_shard": "skip",
                  "data.cache.dir": str(tmp_path / "cache"), "data.shard_cache.dir": str(tmp_path / "shards"),
                  "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": server.uri,
                  "train.max_steps": 40, "train.log_every": 10, "train.eval_every": 20, "checkpoint.every_steps": 20,
                  "scaling.min_workers": 1, "scaling.max_workers": 1}
        spec = {"common": common, "repo": str(REPO), "server_pid": server.proc.pid,
                "state_dump": str(tmp_path / "state.json")}
        (tmp_path / "input").mkdir()  # the user's own input, which holds the secret: not searched
        (tmp_path / "input" / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_TOKEN": token,
               "AWS_DEFAULT_REGION": "us-east-1", "OPENCLAW_HOME": str(tmp_path / "home")}
        env.pop("RAY_ADDRESS", None)
        r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "input" / "spec.json")], env=env,
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    finally:
        s3.stop()
        if server.proc.poll() is None:
            server.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # What was written is there (the search below is not vacuous)...
    spool = next((tmp_path / "runs" / "secret-spooled").glob("tracking-spool-*.jsonl"))
    finish = [json.loads(line) for line in spool.read_text().splitlines() if '"finish"' in line]
    assert finish and finish[0]["args"][0]["data"]["s3"]["secret_access_key"] == "***"
    assert oct(spool.stat().st_mode & 0o777) == "0o600"
    configs = list((tmp_path / "runs").rglob("checkpoint_*/config.json"))
    assert configs and all(json.loads(c.read_text())["data"]["s3"]["secret_access_key"] == "***" for c in configs)
    assert list((tmp_path / "runs" / "secret-sweep").rglob("*.pkl")) or list(
        (tmp_path / "runs" / "secret-sweep").rglob("experiment_state*.json"))  # Tune's saved state
    assert (tmp_path / "mlflow" / "mlflow.db").stat().st_size > 0 and list((tmp_path / "mlflow" / "artifacts").rglob("*"))
    state = json.loads((tmp_path / "state.json").read_text())
    assert any("TrackingService" in a for a in state["actors"]) and any("RayTrainWorker" in a for a in state["actors"])

    # ...and the secret is nowhere in it.
    for value in (secret, token):
        found = [str(p) for p in tmp_path.rglob("*") if p.is_file() and value.encode() in p.read_bytes()
                 and (tmp_path / "input") not in p.parents]
        assert found == [], found
        assert value not in r.stdout and value not in r.stderr
