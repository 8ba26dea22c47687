"""`train.compile` on real Ray workers (CPU, Inductor): the text-lm example reaches its quality bar
compiled, and a restarted worker group loads the run's compile cache. (A resume with compile toggled is
tested on the engine, `tests/test_compile.py`: it rests on the checkpoint keys, which the engine makes.)"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO, live_workers, newest_logged_step

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _metric(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_text_lm_compiled_beats_the_unigram_baseline_and_a_restart_loads_the_compile_cache(ray_local, text_dir,
                                                                                           tmp_path, mlflow_uri):
    unigram = json.loads((text_dir / "stats.json").read_text())["unigram_entropy_nats"]
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {
        "name": "compiled", "data.train": str(text_dir / "train"), "data.val": str(text_dir / "val"),
        "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri, "train.compile": {"cache": True},
        "model.kwargs.block_size": 64, "model.kwargs.depth": 2, "train.max_steps": 150, "train.eval_every": 0,
        "checkpoint.every_steps": 50, "train.record_samples": True, "failure.max_failures": 2})
    run_dir, killed = tmp_path / "runs" / "compiled", []

    def kill_after_the_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            pids = live_workers(run_dir)
            if len(pids) == 2 and max(newest_logged_step(run_dir, pid) for pid in pids) >= 60:
                os.kill(min(pids), signal.SIGKILL)
                killed.append(min(pids))
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_the_first_checkpoint)
    killer.start()
    result = openclaw.train(cfg)
    killer.join()
    assert killed and result.metrics["val/loss"] < unigram - 0.5, (result.metrics, unigram)

    events = openclaw.events(result.run_id, tracking_uri=mlflow_uri)
    assert [e["event"] for e in events if e["event"] in ("start", "restart")] == ["start", "restart"]
    restart = next(e for e in events if e["event"] == "restart")
    caches = [e for e in events if e["event"] == "compile_cache"]
    saved = [e for e in caches if "saved_bytes" in e]
    assert saved and saved[0]["saved_bytes"] > 0 and saved[0]["t"] < restart["t"]
    assert (run_dir / "compile_cache" / "rank0.bin").exists() and (run_dir / "compile_cache" / "rank1.bin").exists()
    loaded = [e for e in caches if "loaded_artifacts" in e]
    # The restarted group loaded it before its first step (so before it recorded its restart).
    assert loaded and loaded[0]["loaded_artifacts"] > 0 and saved[0]["t"] < loaded[0]["t"]
    assert loaded[0]["step"] == restart["resumed_from_step"]
    hits = _metric(MlflowClient(mlflow_uri), result.run_id, "perf/compile_cache_hits")
    assert max(v for s, v in hits.items() if s > 50) > 0  # the restarted group's compile hit the cache
    state = torch.load(Path(result.checkpoint) / "model.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state)
