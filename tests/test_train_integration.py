"""End to end on a real local Ray instance, a real MLflow sqlite store, and real worker SIGKILLs."""
import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import digits_config
from openclaw.tracking_service import ATTEMPT_EVENTS

pytestmark = pytest.mark.integration


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in p.info["cmdline"] or [])]


def test_digits_example_trains_tracks_and_reloads(ray_local, digits_dir, tmp_path, mlflow_uri):
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri)
    t0 = time.monotonic()
    result = openclaw.train(cfg)
    assert time.monotonic() - t0 < 180
    assert result.metrics["val/accuracy"] >= 0.95 and result.metrics["step"] == cfg.train.max_steps

    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-mlp"
    assert run.data.params["train.global_batch_size"] == "64" and run.data.params["model.name"] == "mlp"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "openclaw" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    logged = [s for s, _ in _history(client, result.run_id, "train/loss")]
    assert logged == list(range(25, 301, 25))  # one value per logged step, none twice
    assert [s for s, _ in _history(client, result.run_id, "val/accuracy")] == [100, 200, 300]
    for key in ("train/lr", "train/samples_per_s", "val/loss"):
        assert _history(client, result.run_id, key)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "events.json"} <= artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [result.run_id]  # MLflow 3: the model is a LoggedModel
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2

    model = openclaw.load_model(result.checkpoint)
    import pyarrow.parquet as pq
    val = pq.read_table(digits_dir / "val")
    x = torch.tensor(val.column("x").to_pylist())
    acc = (model(x).argmax(1) == torch.tensor(val.column("y").to_pylist())).float().mean().item()
    assert acc == pytest.approx(result.metrics["val/accuracy"], abs=1e-6)

    import mlflow.pytorch
    mlflow.set_tracking_uri(mlflow_uri)
    logged_model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert torch.equal(logged_model(x[:8]), model(x[:8]))


def test_sigkilled_worker_resumes_bit_for_bit(ray_local, digits_dir, tmp_path, mlflow_uri):
    common = {"train.max_steps": 240, "checkpoint.every_steps": 20, "train.log_every": 10, "train.eval_every": 0}
    clean = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="clean", **common))

    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, name="killed", **common)
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any((d / "manifest.json").exists() for d in run_dir.glob("checkpoint_*")):
                for proc in _train_workers()[-1:]:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    result = openclaw.train(cfg)
    killer.join()
    assert killed, "no worker was killed"
    assert result.metrics["step"] == 240

    final, reference = openclaw.load_model(result.checkpoint), openclaw.load_model(clean.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))

    client = MlflowClient(mlflow_uri)
    steps = [s for s, _ in _history(client, result.run_id, "train/loss")]
    assert steps == list(range(10, 241, 10))  # the replayed steps were not logged twice
    assert _history(client, result.run_id, "train/loss") == _history(client, clean.run_id, "train/loss")
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    attempts = [e for e in events if e["event"] in ATTEMPT_EVENTS]
    assert [e["event"] for e in attempts][:2] == ["start", "restart"] and attempts[1]["resumed_from_step"] >= 20
    saved = {e["step"] for e in events if e["event"] == "checkpoint"}
    assert 240 in saved and saved <= set(range(20, 241, 20))


def test_text_lm_beats_the_unigram_baseline(ray_local, text_dir, tmp_path, mlflow_uri):
    from conftest import REPO
    unigram = json.loads((text_dir / "stats.json").read_text())["unigram_entropy_nats"]
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {
        "data.train": str(text_dir / "train"), "data.val": str(text_dir / "val"),
        "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri,
        "model.kwargs.block_size": 64, "model.kwargs.depth": 2, "train.max_steps": 150,
        "train.eval_every": 0, "checkpoint.every_steps": 150})
    result = openclaw.train(cfg)
    assert result.metrics["val/loss"] < unigram - 0.5, (result.metrics, unigram)


def test_datasets_keep_file_order(ray_local, tmp_path):
    """Row positions must not depend on which Ray read task finishes first."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openclaw.data import resolve
    from openclaw.launch import read_datasets
    for i in range(12):  # shards of very different sizes finish reading in a different order
        rows = 20_000 if i % 3 == 0 else 50
        pq.write_table(pa.table({"x": np.arange(rows, dtype=np.int64) + i * 1_000_000}),
                       tmp_path / f"part-{i:03d}.parquet")
    ds = read_datasets({"train": resolve(str(tmp_path), "data.train")})["train"]
    got = np.concatenate([b["x"] for b in ds.iter_batches(batch_format="numpy", batch_size=None)])
    want = pq.read_table(sorted(tmp_path.glob("*.parquet"))).column("x").to_numpy()
    assert np.array_equal(got, want)


def test_corrupt_newest_checkpoint_is_skipped_on_resume(ray_local, digits_dir, tmp_path, mlflow_uri, capsys):
    common = {"name": "corrupt", "train.eval_every": 0, "train.log_every": 10, "checkpoint.every_steps": 20,
              "checkpoint.keep": 3}
    first = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, **common, **{"train.max_steps": 60}))
    newest = sorted(p for p in (tmp_path / "runs" / "corrupt").glob("checkpoint_*") if p.is_dir())[-1]
    assert json.loads((newest / "manifest.json").read_text())["step"] == 60
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 3])  # a torn write

    again = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, **common, **{"train.max_steps": 80}))
    assert again.run_id == first.run_id and again.metrics["step"] == 80
    out = capsys.readouterr().out
    assert f"skipping invalid checkpoint: checkpoint {newest}: model.pt is" in out
    assert "resume at step 40/80" in out
    client = MlflowClient(mlflow_uri)
    events = json.load(open(client.download_artifacts(again.run_id, "events.json", str(tmp_path))))
    invalid = [e for e in events if e["event"] == "checkpoint_invalid"]
    assert invalid and invalid[0]["checkpoint"] == str(newest)
    assert [e["resumed_from_step"] for e in events if e["event"] == "resume"] == [40]
    # steps 50 and 60 were trained twice, but each is recorded once
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == list(range(10, 81, 10))
