"""End to end on a real local Ray instance, a real MLflow sqlite store, and real worker SIGKILLs."""
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

import openclaw
from conftest import committed_batches, digits_config, exited_pid, live_workers, newest_logged_step
from openclaw.runtime import staging
from openclaw.tracking.model import LINKED_METRICS
from openclaw.tracking.writer import ATTEMPT_EVENTS

pytestmark = pytest.mark.integration


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _train_workers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in p.info["cmdline"] or [])}


def test_digits_example_trains_tracks_and_reloads(ray_local, digits_dir, tmp_path, mlflow_uri):
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, **{"tracking.register_as": "digits-mlp"})
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
    # ...with the run's params, a run output at the final step, and the final evaluation and loss linked
    # (the runs' points themselves, which the histories above show once each)
    (logged_model,) = models
    assert logged_model.params == run.data.params and logged_model.status == LoggedModelStatus.READY
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged_model.model_id, 300)]
    linked = {k: v for k, v in run.data.metrics.items() if k.startswith(LINKED_METRICS)}
    assert sorted(linked) == ["train/loss", "val/accuracy", "val/loss"]
    assert {m.key: (m.step, m.value, m.run_id) for m in logged_model.metrics} == {
        k: (300, v, result.run_id) for k, v in linked.items()}
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2 and events[0]["blocks"] == 0  # an MLP
    # The precision, resolved on the workers' device: printed, a param and an event, once.
    assert run.data.params["resolved/precision"] == "fp32" and "CPU" in run.data.params["resolved/precision_reason"]
    assert [e["precision"] for e in events if e["event"] == "precision"] == ["fp32"]
    # FLOPs per sample, counted with FlopCounterMode: the MLP's 6 x (64x128 + 128x128 + 128x10) less the
    # first layer's input gradient (2 x 64x128), at the logged samples/s; no MFU on a CPU.
    flops = _history(client, result.run_id, "perf/flops_per_s")
    sps = dict(_history(client, result.run_id, "perf/samples_per_s"))
    per_sample = 6 * (64 * 128 + 128 * 128 + 128 * 10) - 2 * 64 * 128
    assert flops and all(v == pytest.approx(sps[s] * per_sample) for s, v in flops)
    assert not _history(client, result.run_id, "perf/mfu")

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
    # openclaw.load_model takes a run id or a registry URI as well as a checkpoint
    for source in (result.run_id, "models:/digits-mlp/1"):
        assert torch.equal(openclaw.load_model(source, tracking_uri=mlflow_uri)(x[:8]), model(x[:8]))
    with pytest.raises(openclaw.CheckpointError, match="models:/digits-mlp/7"):
        openclaw.load_model("models:/digits-mlp/7", tracking_uri=mlflow_uri)


def test_three_random_sigkills_with_async_checkpoints_lose_and_repeat_nothing_and_end_bit_for_bit(ray_local, digits_dir, tmp_path,
                                                                             mlflow_uri):
    import random
    # Shuffle windows of one shard: each worker holds two of the four shards, reads the next one ahead and
    # evicts, so exact resume is checked on the streaming path.
    common = {"train.max_steps": 600, "checkpoint.every_steps": 50, "train.log_every": 10, "train.eval_every": 0,
              "failure.max_failures": 3, "train.record_samples": True, "data.shuffle_window_shards": 1}
    clean = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="clean", **common))

    # The faulty run saves in the background (checkpoint.async), the clean one synchronously.
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, name="killed", **common, **{"checkpoint.async": True})
    run_dir = tmp_path / "runs" / "killed"
    # (each at least 150 steps before the end: a poll that saw step 554 could come after the run's end)
    targets = sorted(random.Random(1234).sample(range(60, 450), 3))
    killed: list[tuple[int, int]] = []

    def newest_step(pids) -> int:
        return max((newest_logged_step(run_dir, pid) for pid in pids), default=-1)

    def kill_at_random_steps():
        deadline = time.monotonic() + 300
        for target in targets:
            while time.monotonic() < deadline:
                # This run's training workers: a worker of another run on the machine has no ledger here, and a
                # killed group's survivor lives on as an idle Ray worker, no longer named RayTrainWorker.
                pids = (live_workers(run_dir) & _train_workers()) - {pid for pid, _ in killed}
                step = newest_step(pids)
                if step >= target and len(pids) == 2:
                    victim = random.Random(target).choice(sorted(pids))
                    os.kill(victim, signal.SIGKILL)
                    killed.append((victim, step))
                    break
                time.sleep(0.005)

    # What a worker killed in the middle of a save leaves in the node's temp folder (here, before the run):
    # the next worker of this host removes it, and leaves a live process's folder alone.
    tmp, host = Path(tempfile.gettempdir()), staging._host()
    planted = {"exited": tmp / f"{staging.PREFIX}{host}-{exited_pid()}-test01",
               "live": tmp / f"{staging.PREFIX}{host}-{os.getpid()}-test02"}
    for d in planted.values():
        d.mkdir()
        (d / "model.pt").write_bytes(b"x" * 1024)

    killer = threading.Thread(target=kill_at_random_steps)
    killer.start()
    result = openclaw.train(cfg)
    killer.join()
    assert len(killed) == 3, f"killed {killed}, targets {targets}"
    assert not planted["exited"].exists() and (planted["live"] / "model.pt").exists()
    shutil.rmtree(planted["live"])
    # Nor is any folder of the killed workers left: each restart's workers removed their predecessors'.
    assert not [d for d in tmp.glob(f"{staging.PREFIX}{host}-*") if not staging._alive(int(d.name.split("-")[-2]))]
    assert result.metrics["step"] == 600

    # Every sample position exactly once per epoch, in the order of the clean run.
    got, want = committed_batches(run_dir), committed_batches(tmp_path / "runs" / "clean")
    assert sorted(got) == list(range(600))
    assert all(got[s]["positions"] == want[s]["positions"] for s in range(600))
    for epoch in {b["epoch"] for b in got.values()}:
        seen = [p for b in got.values() if b["epoch"] == epoch for p in b["positions"]]
        assert len(seen) == len(set(seen)) == 64 * sum(b["epoch"] == epoch for b in got.values())
    ledger_lines = sum(len(f.read_text().splitlines()) for f in (run_dir / "samples").glob("*.jsonl"))
    assert ledger_lines > 2 * 600  # some steps did run twice: the kills cost replays, not data

    final, reference = openclaw.load_model(result.checkpoint), openclaw.load_model(clean.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))

    client = MlflowClient(mlflow_uri)
    steps = [s for s, _ in _history(client, result.run_id, "train/loss")]
    assert steps == list(range(10, 601, 10))  # the replayed steps were not logged twice
    assert _history(client, result.run_id, "train/loss") == _history(client, clean.run_id, "train/loss")
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    attempts = [e for e in events if e["event"] in ATTEMPT_EVENTS]
    assert [e["event"] for e in attempts] == ["start", "restart", "restart", "restart"]
    # Each worker group's first completed step follows its start, at the step it resumed from (where a
    # recovery's clock stops: bench/recovery.py), and before the next group starts.
    firsts = [e for e in events if e["event"] == "first_step"]
    assert [f["step"] for f in firsts] == [a["resumed_from_step"] for a in attempts]
    assert all(a["t"] <= f["t"] for a, f in zip(attempts, firsts))
    assert all(f["t"] < a["t"] for f, a in zip(firsts, attempts[1:]))
    assert all(0 < f["setup_s"] < 60 and f["world_size"] == 2 for f in firsts)
    saved = {e["step"]: e["mode"] for e in events if e["event"] == "checkpoint"}
    assert saved[600] == "sync" and set(saved) <= set(range(50, 601, 50))
    assert "async" in saved.values()
    # Each checkpoint event names its checkpoint's URI; the final one is the run's result.
    uris = {e["step"]: e["checkpoint"] for e in events if e["event"] == "checkpoint"}
    assert all(u.startswith(f"{run_dir}/checkpoint_") for u in uris.values()) and uris[600] == result.checkpoint


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


def test_perf_and_system_metrics_are_logged_per_window(ray_local, text_dir, tmp_path, mlflow_uri):
    from conftest import REPO
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {
        "data.train": str(text_dir / "train"), "data.val": None, "checkpoint.storage": str(tmp_path / "runs"),
        "tracking.uri": mlflow_uri, "model.kwargs.block_size": 64, "model.kwargs.depth": 1, "train.max_steps": 20,
        "train.log_every": 10, "train.eval_every": 0, "checkpoint.every_steps": 10})
    result = openclaw.train(cfg)
    metrics = MlflowClient(mlflow_uri).get_run(result.run_id).data.metrics
    split = [metrics[f"perf/step_{k}_s"] for k in ("data", "compute", "checkpoint")]
    assert all(v >= 0 for v in split) and metrics["perf/step_compute_s"] > 0
    # The example's steps do not wait on data once its shards are in memory (the last window's figure).
    assert 0 <= metrics["perf/data_wait_frac"] < 0.05 and metrics["perf/ingest_rows_per_s"] > 0
    assert metrics["perf/time_to_first_step_s"] > 0
    assert metrics["perf/tokens_per_s"] == pytest.approx(metrics["perf/samples_per_s"] * 64, rel=1e-6)
    assert "perf/mfu" not in metrics  # no known peak on a CPU
    assert 0 < metrics["system/node0/memory_percent"] <= 100 and "system/node0/cpu_percent" in metrics
    assert not any(k.startswith("system/node1/") for k in metrics)  # one node: one sample, not one per worker
    assert metrics["perf/checkpoint_stall_s"] > 0
    # every rank's split (DDP measures its all-reduce wait), the straggler index, what a worker may fill
    for rank in range(cfg.scaling.max_workers):
        parts = [metrics[f"perf/rank{rank}/{k}_frac"] for k in ("data", "compute", "comm", "checkpoint", "idle")]
        assert all(0 <= v <= 1 for v in parts) and sum(parts) == pytest.approx(1.0), parts
        assert metrics[f"perf/rank{rank}/checkpoint_frac"] > 0  # the last window holds the step-20 checkpoint
        # (about half here; the window also holds the step-20 checkpoint and report, which a loaded machine
        # stretches: a compute that was not measured at all reads 0)
        assert metrics[f"perf/rank{rank}/compute_frac"] > 0.1
    assert f"perf/rank{cfg.scaling.max_workers}/data_frac" not in metrics
    assert metrics["perf/comm_frac"] == max(metrics[f"perf/rank{r}/comm_frac"] for r in range(cfg.scaling.max_workers))
    assert metrics["perf/straggler_index"] >= 1.0 and metrics["perf/slowest_rank"] in range(cfg.scaling.max_workers)
    assert metrics["perf/memory_capacity_bytes"] > metrics["perf/state_bytes_per_rank"] > 0
    assert 0 < metrics["perf/peak_activation_bytes"] <= metrics["perf/peak_memory_bytes"]


def test_scale_lr_policy_trains_a_smaller_world_with_its_own_batch_and_a_scaled_lr(ray_local, digits_dir, tmp_path,
                                                                                  mlflow_uri):
    # Elastic (1, 2) workers of 5 CPUs each on an 8-CPU instance: only one fits, so the world is 1 of 2.
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, name="scale-lr", **{
        "scaling.min_workers": 1, "scaling.max_workers": 2, "scaling.resources_per_worker": {"CPU": 5},
        "elastic.on_resize": "scale_lr", "elastic.lr_rule": "sqrt", "train.max_steps": 40, "train.log_every": 10,
        "train.eval_every": 0, "checkpoint.every_steps": 20, "train.record_samples": True,
        "train.schedule.name": "constant", "train.schedule.warmup_steps": 0})
    result = openclaw.train(cfg)
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["train/global_batch_size"] == 32  # 64 at 2 workers: each worker keeps its 32
    assert metrics["train/lr"] == pytest.approx(3e-3 * 0.5 ** 0.5)
    batches = committed_batches(tmp_path / "runs" / "scale-lr")
    assert {b["world"] for b in batches.values()} == {1} and all(len(b["positions"]) == 32 for b in batches.values())
    seen = [p for b in batches.values() if b["epoch"] == 0 for p in b["positions"]]
    assert len(seen) == len(set(seen))
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    start = next(e for e in events if e["event"] == "start")
    assert (start["world_size"], start["global_batch_size"], start["lr_factor"]) == (1, 32, pytest.approx(0.5 ** 0.5))


@pytest.mark.parametrize("address_file", ["absent", "a dead cluster", "this cluster"])
def test_rays_placement_group_cleaner_is_started_only_where_the_state_api_finds_this_cluster(ray_local, tmp_path,
                                                                                            monkeypatch, address_file):
    """Ray Train's cleaner asks the state API whether the controller lives, and the state API looks for its
    cluster in the address file of the last `ray start`. On the instance `ray.init()` started, a file left
    by a killed cluster made every run's end wait out the cleaner's 12 s stop timeout."""
    from ray.train import ScalingConfig

    from openclaw.launch.ray_setup import OpenclawTorchTrainer
    from openclaw.runtime.ray_private import DatasetsCallback, PlacementGroupCleanerCallback

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray reads the address file
    (tmp_path / "ray").mkdir()
    if address_file != "absent":
        live = ray_local.get_runtime_context().gcs_address
        (tmp_path / "ray" / "ray_current_cluster").write_text(live if address_file == "this cluster" else "127.0.0.1:9")
    kinds = {type(c) for c in OpenclawTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
             ._create_default_callbacks()}
    assert (PlacementGroupCleanerCallback in kinds) == (address_file == "this cluster")
    assert DatasetsCallback not in kinds and len(kinds) > 3  # Ray's other defaults stay
