"""Precision that adapts to the run, on real Ray workers: an fp16 run whose loss scale starts far too high
overflows step after step, switches to bf16 once, at a checkpoint, and stays switched after a SIGKILL."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import digits_config, live_workers, newest_logged_step

pytestmark = pytest.mark.integration


def test_an_unstable_fp16_run_switches_once_at_a_checkpoint_and_stays_switched_after_a_sigkill(ray_local, digits_dir,
                                                                                               tmp_path, mlflow_uri):
    # A first scale of 2^40 overflows fp16 until the scaler has halved it some twenty times: more than half of
    # the first 10 steps overflow, so the run switches at its first checkpoint (step 50).
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, name="fp16", **{
        "train.precision": "fp16", "train.amp.init_scale": 2.0 ** 40, "train.amp.window_steps": 10,
        "train.amp.max_overflow_frac": 0.5, "train.max_steps": 300, "checkpoint.every_steps": 50,
        "train.log_every": 10, "train.eval_every": 0, "failure.max_failures": 2, "train.record_samples": True})
    run_dir, killed = tmp_path / "runs" / "fp16", []

    def kill_after_the_switch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            pids = live_workers(run_dir)
            if len(pids) == 2 and max(newest_logged_step(run_dir, pid) for pid in pids) >= 120:
                victim = min(pids)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_the_switch)
    killer.start()
    result = openclaw.train(cfg)
    killer.join()
    assert killed and result.metrics["step"] == 300 and result.metrics["val/accuracy"] >= 0.9

    events = openclaw.events(result.run_id, tracking_uri=mlflow_uri)
    switches = [e for e in events if e["event"] == "precision_switch"]
    assert len(switches) == 1, switches
    switch = switches[0]
    assert (switch["step"], switch["previous"], switch["precision"]) == (50, "fp16", "bf16")
    assert "overflowed in fp16" in switch["cause"] and switch["overflow_steps"] >= 6
    assert 50 in {e["step"] for e in events if e["event"] == "checkpoint"}  # the switch is in that checkpoint
    assert [e["event"] for e in events if e["event"] in ("start", "restart")] == ["start", "restart"]
    # The restart trained in bf16: it announced no precision of its own (only the first start's fp16).
    assert [e["precision"] for e in events if e["event"] == "precision"] == ["fp16"]
    state = torch.load(Path(result.checkpoint) / "state.pt", weights_only=True)
    assert state["precision"] == state["precision_switched_to"] == "bf16"
    # Overflows were counted while in fp16, and none came after the switch.
    overflow = {m.step: m.value for m in MlflowClient(mlflow_uri).get_metric_history(result.run_id,
                                                                                      "train/overflow_steps")}
    assert overflow[50] == overflow[300] == switch["overflow_steps"] == state["overflow_steps"]
