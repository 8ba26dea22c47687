"""Object storage end to end, on real Ray, a real MLflow sqlite store and moto's real S3 server on
loopback: checkpoints in a bucket through a worker's SIGKILL, and raw shards streamed from a bucket
through the node's shard cache, each fetched once however many epochs and restarts read it."""
import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from urllib.parse import urlparse

import numpy as np
import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import S3Server, digits_config
from openclaw.launch.preflight import preflight
from openclaw.launch.session import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def recorded_s3(tmp_path, monkeypatch):
    """A fresh S3 server that can log every request it serves (moto's recorder), to `server.recording`."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path / "s3-requests.jsonl"))
    server = S3Server().start()
    server.recording = tmp_path / "s3-requests.jsonl"
    yield server
    server.stop()


def _requests(server) -> list[tuple[str, str]]:
    """(method, path) of every request the server logged since its recording started."""
    lines = server.recording.read_text().splitlines() if server.recording.exists() else []
    return [(e["method"], urlparse(e["url"]).path) for e in map(json.loads, lines)]


def _train_workers() -> list[int]:
    """The Ray Train worker processes of this session's Ray instance (whose raylet this process started),
    whatever other Ray instances run on the machine; not the processes they fork, which keep their title."""
    procs = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in c for c in p.cmdline()):
                procs[p.pid] = p.ppid()
        except psutil.Error:  # it ended while we looked
            pass
    return sorted(pid for pid, parent in procs.items() if parent not in procs)


def _published(fs, run_root: str) -> list[str]:
    """The run's checkpoint folders in the bucket whose manifest (written last) is there, oldest first."""
    infos = fs.get_file_info(pafs.FileSelector(run_root, allow_not_found=True, recursive=True))
    return sorted(i.path.rsplit("/", 1)[0] for i in infos if i.path.endswith("/manifest.json"))


def test_s3_checkpoints_survive_a_sigkill_and_s3_shards_are_fetched_once_across_epochs_and_the_restart(
        ray_local, recorded_s3, digits_dir, tmp_path, mlflow_uri, monkeypatch):
    s3 = recorded_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # data and checkpoints: the standard environment
    train_uri = s3.upload(digits_dir / "train", "data/digits/train")
    fs = s3.filesystem()
    fs.create_dir("ckpt")
    # 160 steps of 64 samples: seven epochs of 1438 rows. No transform: the workers read the raw shards.
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, name="s3-kill", **{
        "data.train": train_uri, "data.shard_cache.dir": str(tmp_path / "shards"),
        "checkpoint.storage": "s3://ckpt/runs", "checkpoint.every_steps": 20, "checkpoint.keep": 2,
        "checkpoint.async": True,  # the background saves publish themselves; the final one goes through Ray
        "train.max_steps": 160, "train.log_every": 20, "train.eval_every": 0})
    sources = preflight(cfg)  # the driver reads the footers: before the recording starts
    urllib.request.urlopen(urllib.request.Request(f"{s3.endpoint}/moto-api/recorder/start-recording", method="POST"))
    killed: list[tuple[int, list[str]]] = []

    def kill_once_two_checkpoints_are_in_the_bucket():  # so the older one is surely whole
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            published, workers = _published(fs, "ckpt/runs/s3-kill"), _train_workers()
            if len(published) >= 2 and len(workers) == 2:
                os.kill(workers[0], signal.SIGKILL)
                killed.append((workers[0], published))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once_two_checkpoints_are_in_the_bucket)
    killer.start()
    result = train(cfg, sources=sources)  # as the CLI does: the checked sources
    killer.join()
    requests = _requests(s3)
    print("killed", killed, "data requests", Counter(r for r in requests if r[1].startswith("/data/")))
    assert killed, "no worker was killed"
    assert result.metrics["step"] == 160 and result.metrics["train/epoch"] >= 6

    # ---- the restart resumed from a checkpoint it read from the bucket
    client = MlflowClient(mlflow_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    attempts = [e for e in events if e["event"] in ("start", "restart")]
    assert [e["event"] for e in attempts] == ["start", "restart"], events
    restart = attempts[1]
    assert restart["resumed_from_step"] >= 20 and restart["resumed_from_step"] % 20 == 0
    assert restart["checkpoint"].startswith("s3://ckpt/runs/s3-kill/checkpoint_")
    assert ("GET", restart["checkpoint"].removeprefix("s3:/") + "/manifest.json") in requests
    saved = {e["step"]: e["checkpoint"] for e in events if e["event"] == "checkpoint"}
    assert {20, 160} <= set(saved) <= set(range(20, 161, 20))
    assert all(uri.startswith("s3://ckpt/runs/s3-kill/checkpoint_") for uri in saved.values())

    # ---- the bucket holds the kept checkpoints, whole; Ray Train's controller deleted the older ones
    # there (through the filesystem the driver gave it); nothing went to a local folder; the final model
    # loads from the bucket
    kept = {f"s3://{path}" for path in _published(fs, "ckpt/runs/s3-kill")}
    assert result.checkpoint == saved[160] and {saved[140], saved[160]} <= kept
    deleted = {saved[s] for s in range(restart["resumed_from_step"] + 20, 140, 20)}
    assert deleted and not kept & deleted
    # what else is left is a checkpoint of before the kill that Ray never registered (the worker died
    # before its report reached the controller): openclaw's prune leaves those newer than Ray's newest
    assert kept - {saved[140], saved[160]} <= {f"s3://{path}" for path in killed[0][1]}
    files = {i.base_name for i in fs.get_file_info(pafs.FileSelector(result.checkpoint[5:], recursive=True))}
    assert {"manifest.json", "model.pt", "state.pt"} <= files, files
    assert not (tmp_path / "runs").exists()
    model = openclaw.load_model(result.checkpoint)
    val = pq.read_table(digits_dir / "val")
    x = torch.tensor(np.stack(val.column("x").to_numpy(zero_copy_only=False)), dtype=torch.float32)
    assert (model(x).argmax(1) == torch.tensor(val.column("y").to_numpy())).float().mean().item() > 0.8

    # ---- each raw shard crossed the network once: five epochs and a restarted group read the node's copy
    shard_keys = {"/data/digits/train/" + os.path.basename(s.path) for s in sources["train"].shards}
    gets = Counter(path for method, path in requests if method == "GET" and path.startswith("/data/"))
    assert gets == Counter({key: 1 for key in shard_keys}), gets
    assert len(list((tmp_path / "shards").glob("*.parquet"))) == len(shard_keys) == 4
