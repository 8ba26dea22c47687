"""Advice end to end on a real local Ray instance and a sqlite MLflow store: three digits runs, each
configured so that its bottleneck is real, get the right top recommendation (printed at their end,
logged as advice.md / advice.json, and printed again by `openclaw advise RUN_ID`); the same run with
the recommended change, measured the same way, moves the figure the right way.

One worker each, so that no collective wait on this machine's two shared cores competes with the
bottleneck under test."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import openclaw
from openclaw.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]

ONE_WORKER = {"scaling.min_workers": 1, "scaling.max_workers": 1, "train.max_steps": 30, "train.log_every": 5,
              "train.eval_every": 0, "checkpoint.every_steps": 1000}
SLOW_S_PER_ROW = 0.005


def slow_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A user transform (`data.transforms` map_batches) that costs 5 ms a row and changes nothing. The
    first rows the driver tries before anything starts (64 of them) go at full speed."""
    rows = len(next(iter(batch.values())))
    if rows > 64:
        time.sleep(rows * SLOW_S_PER_ROW)
    return batch


def _train(digits_dir, tmp_path, mlflow_uri, name, **overrides):
    from conftest import digits_config  # here: Ray Data's tasks import this module for `slow_rows`, without it
    return openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name=name, **{**ONE_WORKER, **overrides}))


def _advice(mlflow_uri, run_id, tmp_path) -> dict:
    """The advice the run logged at its end (advice.json), after checking advice.md is beside it."""
    client = MlflowClient(mlflow_uri)
    assert {"advice.md", "advice.json"} <= {a.path for a in client.list_artifacts(run_id)}
    with open(client.download_artifacts(run_id, "advice.json", str(tmp_path))) as f:
        return json.load(f)


def _steady(mlflow_uri, run_id, key) -> list[tuple[int, float]]:
    """A metric's (step, value) per log window, the attempt's first window (start-up) left out."""
    points = sorted((m.step, m.value) for m in MlflowClient(mlflow_uri).get_metric_history(run_id, key))
    return points[1:]


def _median(mlflow_uri, run_id, key) -> float:
    return statistics.median(v for _, v in _steady(mlflow_uri, run_id, key))


def _checkpoint_share(mlflow_uri, run_id) -> float:
    """Checkpoint stalls over the step's time, summed over the windows (each of `log_every` steps)."""
    parts = {k: dict(_steady(mlflow_uri, run_id, f"perf/step_{k}_s")) for k in ("data", "compute", "checkpoint")}
    busy = sum(sum(p.values()) for p in parts.values())
    return sum(parts["checkpoint"].values()) / busy


def test_a_tiny_micro_batch_with_large_accumulation_is_told_to_merge_them(ray_local, digits_dir, tmp_path,
                                                                          mlflow_uri, capsys):
    before = _train(digits_dir, tmp_path, mlflow_uri, "tiny-micro", **{"train.micro_batch_size": 1})
    printed = capsys.readouterr().out
    top = _advice(mlflow_uri, before.run_id, tmp_path)["recommendations"][0]
    assert top["rule"] == "small_micro_batch" and top["key"] == "train.micro_batch_size" and top["value"] == 64
    assert "[small_micro_batch]" in printed and "--set train.micro_batch_size=64" in printed
    assert main(["advise", before.run_id, "--tracking-uri", mlflow_uri]) == 0  # any finished run, again
    assert "1. [small_micro_batch]" in capsys.readouterr().out

    after = _train(digits_dir, tmp_path, mlflow_uri, "merged-micro", **{top["key"]: top["value"]})
    slow, fast = (_median(mlflow_uri, r.run_id, "perf/samples_per_s") for r in (before, after))
    print(f"\nmicro-batch 1 x 64: {slow:,.0f} samples/s; micro-batch 64 x 1: {fast:,.0f} samples/s "
          f"({fast / slow:.1f}x)")
    assert fast > 1.5 * slow


def test_a_checkpoint_every_step_is_told_to_save_less_often(ray_local, digits_dir, tmp_path, mlflow_uri, capsys):
    before = _train(digits_dir, tmp_path, mlflow_uri, "every-step", **{"checkpoint.every_steps": 1})
    advice = _advice(mlflow_uri, before.run_id, tmp_path)
    top = advice["recommendations"][0]
    # Each of these stalls is mostly Ray Train's report of the checkpoint, not its write (the MLP's state is
    # well under a megabyte): the rule asks to save less often, which `checkpoint.async` would not.
    assert top["rule"] == "checkpoint_stall" and top["key"] == "checkpoint.every_steps" and top["value"] == 30
    assert advice["facts"]["checkpoint_frac"] > 0.05 and advice["facts"]["checkpoint_bytes"] < 1e6
    assert "1. [checkpoint_stall]" in capsys.readouterr().out

    # The change, with tracking off: the advice still prints at the end, from the final metrics.
    after = _train(digits_dir, tmp_path, mlflow_uri, "every-30",
                   **{top["key"]: top["value"], "tracking.enabled": False})
    printed = capsys.readouterr().out
    assert "openclaw: advice (the final log window)" in printed and "[checkpoint_stall]" not in printed
    stalled = _checkpoint_share(mlflow_uri, before.run_id)
    last = after.metrics
    share = last["perf/step_checkpoint_s"] / sum(last[f"perf/step_{k}_s"] for k in ("data", "compute", "checkpoint"))
    print(f"\ncheckpoint share of the step: every step {stalled:.0%}; every 30 steps {share:.0%}; samples/s "
          f"{_median(mlflow_uri, before.run_id, 'perf/samples_per_s'):,.0f} -> {last['perf/samples_per_s']:,.0f}")
    assert share < stalled / 2 and last["perf/samples_per_s"] > _median(mlflow_uri, before.run_id,
                                                                          "perf/samples_per_s")


def test_a_slow_transform_prepared_outside_a_pinned_cache_is_told_to_pin_it(ray_local, digits_dir, tmp_path,
                                                                            mlflow_uri, monkeypatch):
    # Imported by Ray Data's tasks as `tests.test_advice_e2e`: the driver's working folder (the repository's
    # root, where `make test` runs) is on its workers' path.
    monkeypatch.syspath_prepend(str(REPO))
    slow = {"data.transforms": [{"op": "map_batches", "fn": "tests.test_advice_e2e:slow_rows"}],
            "train.micro_batch_size": 64}
    before = _train(digits_dir, tmp_path / "a", mlflow_uri, "slow-prep", **slow)
    advice = _advice(mlflow_uri, before.run_id, tmp_path)
    top = advice["recommendations"][0]
    cache = str(tmp_path / "a" / "runs" / ".data-cache")
    assert top["rule"] == "data_preparation" and top["key"] == "data.cache.dir" and top["value"] == cache
    assert advice["facts"]["prepare_cache"] == "miss" and advice["facts"]["prepare_s"] > 0
    assert MlflowClient(mlflow_uri).get_run(before.run_id).data.tags["openclaw.data.cache_dir"] == cache

    # Another job (another `checkpoint.storage`) with the cache pinned where the first prepared it.
    after = _train(digits_dir, tmp_path / "b", mlflow_uri, "pinned-cache", **slow, **{top["key"]: top["value"]})
    run = MlflowClient(mlflow_uri).get_run(after.run_id)
    assert run.data.tags["openclaw.data.train.cache"] == "hit" and run.data.metrics["data/train/prepare_s"] == 0
    first_steps = [MlflowClient(mlflow_uri).get_metric_history(r.run_id, "perf/time_to_first_step_s")[0].value
                   for r in (before, after)]
    facts = advice["facts"]
    print(f"\nslow transform: preparing took {facts['prepare_s']:.1f} s of {facts['wall_s']:.0f} s; "
          f"time to the first step {first_steps[0]:.1f} s -> {first_steps[1]:.1f} s with the cache pinned")
    assert first_steps[1] < first_steps[0]
    assert not any(r["rule"] == "data_preparation" for r in _advice(mlflow_uri, after.run_id, tmp_path)
                   ["recommendations"])
