"""Elastic training on a real 2-node `ray.cluster_utils.Cluster`: lose a node mid-run, then a
replacement node joins with `ray start --address`.

The cluster runs in its own process (bench/node_loss.py), since this session's local Ray instance
owns this one. The reference run is uninterrupted, at world size 2, with the same config and seed.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO, committed_batches, sqlite_store
from openclaw.engine.optim import lr_at

pytestmark = pytest.mark.integration
sys.path.insert(0, str(REPO / "bench"))
from node_loss import OVERRIDES  # noqa: E402

STEPS = ["train.max_steps=800", "train.optimizer.lr=5e-4", "train.record_samples=true"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_node_loss_shrinks_then_grows_back_and_matches_the_uninterrupted_run(ray_local, digits_dir, tmp_path, strategy):
    """With `fsdp` the model and optimizer are sharded: each resize reshards them from the checkpoint."""
    out = tmp_path / "cluster"
    steps = [*STEPS, f"parallelism.strategy={strategy}"]
    r = subprocess.run([sys.executable, str(REPO / "bench" / "node_loss.py"), "--side", "openclaw", "--out", str(out), "--replacement", "ray-start",
                        *[x for s in steps for x in ("--set", s)]], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["world_sizes"] == [2, 1, 2] and got["causes"] == ["start", "resize", "resize"], got
    assert got["finished_step"] == 800
    assert "cluster changed: 1 node(s) lost" in r.stdout and "resize at step" in r.stdout
    # The replacement joined through `ray start --address`; no worker-group start failed or timed out.
    assert "worker group start failed" not in r.stdout
    # When the node joined, the workers checkpointed on the driver's request; the grow resumed from that
    # checkpoint or a newer one (training goes on until Ray resizes).
    assert got["checkpoints_before_grow"] and got["grow_resumed_from_step"] >= got["checkpoints_before_grow"][-1]

    uri = sqlite_store(tmp_path / "ref.db")
    ref_cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        **OVERRIDES, **dict(s.split("=") for s in steps), "name": "reference", "scaling.min_workers": 2,
        "scaling.resources_per_worker": {"CPU": 1}, "data.train": str(out / "digits" / "train"),
        "data.val": str(out / "digits" / "val"), "checkpoint.storage": str(tmp_path / "ref"), "tracking.uri": uri})
    ref = openclaw.train(ref_cfg)

    # Every step trained on exactly the samples of the uninterrupted run, whatever its world size.
    got_b, ref_b = committed_batches(out / "runs" / "elastic"), committed_batches(tmp_path / "ref" / "reference")
    assert sorted(got_b) == sorted(ref_b) == list(range(800))
    assert all(got_b[s]["positions"] == ref_b[s]["positions"] for s in range(800))
    assert {b["world"] for b in got_b.values()} == {1, 2}
    if strategy == "fsdp":
        manifest = json.loads(open(f"{got['checkpoint']}/manifest.json").read())
        assert manifest["format"] == "sharded" and "model/__1_0.distcp" in manifest["files"]

    # Same samples, same global batch, same LR at every step: only the float summation order differs.
    ref_w, got_w = openclaw.load_model(ref.checkpoint).state_dict(), openclaw.load_model(got["checkpoint"]).state_dict()
    assert all(torch.allclose(got_w[k], ref_w[k], rtol=1e-4, atol=1e-5) for k in ref_w)
    elastic_uri = f"sqlite:///{out / 'mlflow.db'}"
    curve = lambda u, name: {m.step: m.value for m in MlflowClient(u).get_metric_history(  # noqa: E731
        MlflowClient(u).search_runs([MlflowClient(u).get_experiment_by_name("openclaw").experiment_id],
                                    filter_string=f"attributes.run_name = '{name}'")[0].info.run_id, "train/loss")}
    a, b = curve(elastic_uri, "elastic"), curve(uri, "reference")
    # Each logged loss averages the same steps, across the checkpoint before the grow (off the log grid).
    assert sorted(a) == sorted(b)
    worst = max(b, key=lambda s: abs(a[s] - b[s]) / abs(b[s]))
    assert abs(a[worst] - b[worst]) <= 1e-3 * abs(b[worst]), (worst, a[worst], b[worst])


@pytest.mark.slow
def test_scale_lr_through_a_node_loss_scales_the_batch_and_the_lr_with_the_world(tmp_path):
    """`elastic.on_resize: scale_lr` with `lr_rule: sqrt`, through a real shrink (a node lost) and grow (a
    node joins): each worker keeps its batch (global_batch_size / max_workers = 32), so the global batch
    follows the world, and the LR is the schedule's times sqrt(world / max_workers)."""
    out = tmp_path / "cluster"
    steps = [*STEPS, "elastic.on_resize=scale_lr", "elastic.lr_rule=sqrt"]
    r = subprocess.run([sys.executable, str(REPO / "bench" / "node_loss.py"), "--side", "openclaw", "--out", str(out),
                        "--replacement", "ray-start", *[x for s in steps for x in ("--set", s)]],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["world_sizes"] == [2, 1, 2] and got["causes"] == ["start", "resize", "resize"], got

    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml",
                               {**OVERRIDES, **dict(s.split("=") for s in steps)})
    uri = f"sqlite:///{out / 'mlflow.db'}"
    run_id = json.loads((out / "runs" / "elastic" / "openclaw_job.json").read_text())["mlflow_run_id"]
    attempts = [e for e in openclaw.events(run_id, tracking_uri=uri) if e["event"] in ("start", "resize")]
    assert [(e["world_size"], e["global_batch_size"], e["lr_factor"]) for e in attempts] == [
        (2, 64, 1.0), (1, 32, pytest.approx(math.sqrt(1 / 2), rel=1e-12)), (2, 64, 1.0)]

    # Every step's batch, from the sample ledger: 32 samples per worker, whatever the world.
    batches = committed_batches(out / "runs" / "elastic")
    assert sorted(batches) == list(range(800)) and {b["world"] for b in batches.values()} == {1, 2}
    assert all(len(b["positions"]) == 32 * b["world"] for b in batches.values())
    # Each logged LR (that of the window's last step, `step - 1`) is the rule's for that step's world.
    client = MlflowClient(uri)
    logged = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
              for k in ("train/lr", "train/global_batch_size")}
    worlds = {step: batches[step - 1]["world"] for step in logged["train/lr"]}
    assert sorted(worlds) == list(range(50, 801, 50)) and 1 in worlds.values(), worlds
    for step, world in worlds.items():
        rule = lr_at(step - 1, cfg.train.optimizer.lr * math.sqrt(world / 2), cfg.train.schedule, 800)
        assert logged["train/lr"][step] == pytest.approx(rule, rel=1e-12), (step, world)
        assert logged["train/global_batch_size"][step] == 32 * world, (step, world)
