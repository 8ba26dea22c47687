"""Sharded models through Ray Train, end to end: FSDP and tensor/pipeline parallel runs on a real local
Ray instance with real worker SIGKILLs, a resume at another world size, and the shipped FSDP example."""
import json
import os
import random
import signal
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO, committed_batches, newest_logged_step

pytestmark = pytest.mark.integration


def _config(text_dir, tmp_path, mlflow_uri, example="text-lm-fsdp.yaml", **overrides):
    """A shipped example (the FSDP one unless told) at test size: a 2-block GPT on 64-token windows."""
    return openclaw.load_config(REPO / "jobs" / "configs" / example, {
        "data.train": str(text_dir / "train"), "data.val": str(text_dir / "val"),
        "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri, "model.kwargs.block_size": 64,
        "model.kwargs.depth": 2, **overrides})


def _workers():
    return [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in p.info["cmdline"] or [])]


def _val_loss(model, val_dir, rows: int | None = None) -> float:
    import pyarrow.parquet as pq
    tokens = torch.tensor(pq.read_table(val_dir).column("x").to_pylist()[:rows])
    from openclaw.engine.tasks import LanguageModeling
    with torch.no_grad():
        loss, n = LanguageModeling().loss(model, {"x": tokens})
    return loss.item() / n


def test_fsdp_example_beats_the_unigram_baseline_loads_whole_and_resumes_on_one_worker(ray_local, text_dir, tmp_path,
                                                                                     mlflow_uri, capsys):
    unigram = json.loads((text_dir / "stats.json").read_text())["unigram_entropy_nats"]
    common = {"train.eval_every": 0, "checkpoint.every_steps": 50, "train.log_every": 25}
    first = openclaw.train(_config(text_dir, tmp_path, mlflow_uri, **common, **{"train.max_steps": 150}))
    assert first.metrics["val/loss"] < unigram - 0.5, (first.metrics, unigram)
    assert "start at step 0/150 with 2 worker(s) (mesh shard 2), accumulation" in capsys.readouterr().out
    checkpoint = first.checkpoint
    manifest = json.loads(open(f"{checkpoint}/manifest.json").read())
    assert manifest["format"] == "sharded" and {"model/__0_0.distcp", "model/__1_0.distcp"} <= set(manifest["files"])

    # The whole model from the shards, in this one process: it scores the validation set as the run did.
    model = openclaw.load_model(checkpoint)
    assert isinstance(model, torch.nn.Module) and not any(hasattr(p, "to_local") for p in model.parameters())
    assert _val_loss(model, text_dir / "val") == pytest.approx(first.metrics["val/loss"], rel=1e-5)
    # and one file with the whole weights, which loads the same model
    out = tmp_path / "whole.pt"
    from openclaw.cli import main
    assert main(["checkpoint", "consolidate", checkpoint, "--out", str(out)]) == 0
    again = openclaw.load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # a quantized export of the sharded checkpoint gathers it first, and is recorded under its run
    exported = openclaw.export(checkpoint, quantize="int8", evaluate=True, out=tmp_path / "int8", tracking_uri=mlflow_uri)
    rows = int(exported.measured["val_rows"])
    assert exported.measured["val_loss_full"] == pytest.approx(_val_loss(model, text_dir / "val", rows), rel=1e-5)
    assert abs(exported.measured["val_loss_delta"]) < 0.01 * exported.measured["val_loss_full"]
    assert MlflowClient(mlflow_uri).get_run(exported.run_id).data.tags["mlflow.parentRunId"] == first.run_id

    # FSDP holds half the state per worker (measured in the run); its peak memory is logged too.
    metrics = MlflowClient(mlflow_uri).get_run(first.run_id).data.metrics
    full = sum(p.numel() * 4 for p in model.parameters())
    assert metrics["perf/param_bytes_per_rank"] <= 0.55 * full and metrics["perf/peak_memory_bytes"] > 0
    assert metrics["perf/state_bytes_per_rank"] <= 0.55 * 4 * full

    # A torn write of one worker's shard: that checkpoint is found invalid and the one before it is used.
    shard = tmp_path / "runs" / "text-lm-fsdp" / checkpoint.rsplit("/", 1)[1] / "model" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    previous = sorted(str(p) for p in shard.parents[2].glob("checkpoint_*") if p.is_dir())[-2]

    # A machine is lost: the same job on one worker continues from the sharded checkpoint, in the same run.
    capsys.readouterr()
    resumed = openclaw.train(_config(text_dir, tmp_path, mlflow_uri, **common, **{
        "train.max_steps": 200, "scaling.min_workers": 1, "scaling.max_workers": 1}))
    assert resumed.run_id == first.run_id and resumed.metrics["step"] == 200
    out = capsys.readouterr().out
    assert f"skipping invalid checkpoint: checkpoint {checkpoint}: model/__1_0.distcp is" in out
    assert "resize at step 100/200 with 1 worker(s), accumulation 2" in out
    client = MlflowClient(mlflow_uri)
    events = json.load(open(client.download_artifacts(first.run_id, "events.json", str(tmp_path))))
    resize = next(e for e in events if e["event"] == "resize")
    assert resize["world_size"] == 1 and resize["previous_world_size"] == 2 and resize["checkpoint"] == previous
    assert resize["mesh"] == {"pipeline": 1, "replicate": 1, "shard": 1, "tensor": 1}
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == list(range(25, 201, 25))


def test_fsdp_two_random_sigkills_lose_and_repeat_nothing_and_end_bit_for_bit(ray_local, text_dir, tmp_path,
                                                                             mlflow_uri):
    common = {"train.max_steps": 160, "checkpoint.every_steps": 20, "train.log_every": 10, "train.eval_every": 0,
              "failure.max_failures": 3, "train.record_samples": True, "data.shuffle_window_shards": 1,
              "train.global_batch_size": 16, "train.micro_batch_size": 8}
    clean = openclaw.train(_config(text_dir, tmp_path, mlflow_uri, name="clean", **common))
    cfg = _config(text_dir, tmp_path, mlflow_uri, name="killed", **common, **{"checkpoint.async": True})
    run_dir = tmp_path / "runs" / "killed"
    targets = sorted(random.Random(7).sample(range(30, 140), 2))
    killed: list[tuple[int, int]] = []

    def kill_at_random_steps():
        deadline = time.monotonic() + 400
        for target in targets:
            while time.monotonic() < deadline:
                pids = {p.pid for p in _workers()} - {pid for pid, _ in killed}
                step = max((newest_logged_step(run_dir, pid) for pid in pids), default=-1)
                if step >= target and len(pids) == 2:
                    victim = random.Random(target).choice(sorted(pids))
                    os.kill(victim, signal.SIGKILL)
                    killed.append((victim, step))
                    break
                time.sleep(0.005)

    killer = threading.Thread(target=kill_at_random_steps)
    killer.start()
    result = openclaw.train(cfg)
    killer.join()
    assert len(killed) == 2 and result.metrics["step"] == 160, killed

    got, want = committed_batches(run_dir), committed_batches(tmp_path / "runs" / "clean")
    assert sorted(got) == list(range(160)) and all(got[s]["positions"] == want[s]["positions"] for s in range(160))
    for epoch in {b["epoch"] for b in got.values()}:
        seen = [p for b in got.values() if b["epoch"] == epoch for p in b["positions"]]
        assert len(seen) == len(set(seen))
    final, reference = openclaw.load_model(result.checkpoint), openclaw.load_model(clean.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))
    client = MlflowClient(mlflow_uri)
    events = json.load(open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    assert [e["event"] for e in events if e["event"] in ("start", "restart")] == ["start", "restart", "restart"]
    assert "async" in {e["mode"] for e in events if e["event"] == "checkpoint"}


@pytest.mark.parametrize("parallelism", [
    {"tensor": 2}, {"pipeline": 2, "pipeline_schedule": "1f1b"},
    {"example": "text-lm-3d.yaml", "scaling.max_workers": 4, "train.micro_batch_size": "auto",
     "train.max_steps": 10, "train.eval_every": 5, "checkpoint.every_steps": 5, "train.eval_rows": 256}],
    ids=["tensor", "pipeline", "pipeline-x-tensor"])
def test_model_parallel_runs_train_evaluate_and_checkpoint_through_ray(ray_local, text_dir, tmp_path, mlflow_uri,
                                                                        parallelism, capsys):
    """The 3-D example (`jobs/configs/text-lm-3d.yaml`: 4 workers, 2 stages of 2 tensor-parallel workers,
    sharded by FSDP) on one copy of the model: each worker saves its own shard of its stage."""
    keys = {k if "." in k or k == "example" else f"parallelism.{k}": v for k, v in parallelism.items()}
    strategy = {} if "example" in keys else {"parallelism.strategy": "ddp"}
    cfg = _config(text_dir, tmp_path, mlflow_uri, **{"train.max_steps": 40, "train.eval_every": 20,
                                                     "checkpoint.every_steps": 20, "train.record_samples": True,
                                                     **strategy, **keys})
    result = openclaw.train(cfg)
    mesh = " x ".join(f"{k} 2" for k in ("pipeline", "tensor") if getattr(cfg.parallelism, k) == 2)
    workers = cfg.scaling.max_workers
    out, steps = capsys.readouterr().out, cfg.train.max_steps
    assert f"start at step 0/{steps} with {workers} worker(s) (mesh {mesh}), accumulation" in out
    if cfg.train.micro_batch_size == "auto":  # 4 micro-batches per stage (`pipeline_bubble`), 32 samples a step
        assert "micro-batch: 4 (`auto`" in out and f"(mesh {mesh}), accumulation 8" in out
    manifest = json.loads(open(f"{result.checkpoint}/manifest.json").read())
    assert {f"model/__{r}_0.distcp" for r in range(workers)} <= set(manifest["files"])
    if cfg.parallelism.tensor > 1:  # every worker on this one node: each group spans one node, and nothing is advised
        events = json.load(open(MlflowClient(mlflow_uri).download_artifacts(result.run_id, "events.json", str(tmp_path))))
        start = next(e for e in events if e["event"] == "start")
        assert start["tensor_group_nodes"] == 1 and start["workers_per_node"] == [workers], start
        assert start["blocks"] == cfg.model.kwargs["depth"]  # what activation checkpointing would recompute
        assert "tensor_across_nodes" not in out and "tensor-parallel groups" not in out
    if cfg.parallelism.pipeline > 1:  # what each stage waits between its chunks (`pp_wait`) is logged
        waits = MlflowClient(mlflow_uri).get_metric_history(result.run_id, "perf/comm_frac")
        assert waits and all(0 < m.value < 1 for m in waits), waits
        # and `openclaw advise` reads every rank's busy share from the run's history (the pipeline rules')
        from openclaw.advice.report import advise_logged_run
        facts = advise_logged_run(result.run_id, mlflow_uri)[1]
        assert len(facts.rank_busy) == workers and all(0 < b < 1 for b in facts.rank_busy), facts.rank_busy
    # each evaluation scored the first `train.eval_rows` rows (all where unset), said so and how long it took
    rows, total = cfg.train.eval_rows, pq.read_table(text_dir / "val").num_rows
    model = openclaw.load_model(result.checkpoint)
    assert _val_loss(model, text_dir / "val", rows) == pytest.approx(result.metrics["val/loss"], rel=1e-4)
    if rows is not None:  # (the whole set's would be another loss)
        assert _val_loss(model, text_dir / "val") != pytest.approx(result.metrics["val/loss"], rel=1e-4)
    assert out.count(" rows in ") == 2 and f"({rows or total:,} rows in " in out
    assert len(MlflowClient(mlflow_uri).get_metric_history(result.run_id, "perf/eval_s")) == 2
    # one data-parallel rank: every worker trained on the same samples, recorded once
    batches = committed_batches(tmp_path / "runs" / cfg.name)
    assert sorted(batches) == list(range(steps)) and {b["world"] for b in batches.values()} == {1}
