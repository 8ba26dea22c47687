"""`train.on_nonfinite_loss`: a real NaN sample in the data, on real Ray workers."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import digits_config
from openclaw.errors import NonFiniteLossError
from openclaw.data.sampler import Sampler
from openclaw.data.sources import resolve

pytestmark = pytest.mark.integration
BAD_ROW, STEPS = 100, 50


@pytest.fixture(scope="module")
def poisoned(digits_dir, tmp_path_factory):
    """The digits data with one NaN pixel in training row BAD_ROW (of the concatenated shards)."""
    out = tmp_path_factory.mktemp("poisoned")
    (out / "train").mkdir()
    table = pq.read_table(digits_dir / "train")
    x = np.stack(table.column("x").to_numpy(zero_copy_only=False)).astype(np.float32)
    x[BAD_ROW, 5] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    pq.write_table(pa.table({"x": col, "y": table.column("y")}), out / "train" / "part-00000.parquet")
    (out / "val").symlink_to(digits_dir / "val")
    return out


def _bad_steps(cfg):
    rows = resolve(cfg.data.train, "data.train").num_rows  # the (poisoned) training data the run reads
    s = Sampler(rows, cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.seed)
    return [step for step in range(STEPS) if BAD_ROW in s.global_batch(step)]


def _cfg(poisoned, tmp_path, mlflow_uri, policy, name):
    return digits_config(poisoned, tmp_path, mlflow_uri, name=name, **{
        "train.on_nonfinite_loss": policy, "train.max_steps": STEPS, "checkpoint.every_steps": 10,
        "train.log_every": 10, "train.eval_every": 0, "failure.max_failures": 0})


def _events(client, run_id, tmp_path):
    return json.load(open(client.download_artifacts(run_id, "events.json", str(tmp_path))))


def test_skip_and_rollback(ray_local, poisoned, tmp_path, mlflow_uri):
    skip_cfg = _cfg(poisoned, tmp_path, mlflow_uri, "skip", "skip")
    bad = _bad_steps(skip_cfg)
    assert len(bad) >= 2  # the bad row comes round once per epoch
    client = MlflowClient(mlflow_uri)

    skipped = openclaw.train(skip_cfg)
    events = [e for e in _events(client, skipped.run_id, tmp_path) if e["event"] == "nonfinite_loss"]
    assert [e["step"] for e in events] == bad and all(e["action"] == "skip" for e in events)
    assert client.get_run(skipped.run_id).data.metrics["train/skipped_batches"] == len(bad)
    skip_model = openclaw.load_model(skipped.checkpoint)
    assert all(torch.isfinite(p).all() for p in skip_model.parameters())

    rolled = openclaw.train(_cfg(poisoned, tmp_path, mlflow_uri, "rollback", "rollback"))
    events = [e for e in _events(client, rolled.run_id, tmp_path) if e["event"] == "nonfinite_loss"]
    assert [e["step"] for e in events] == bad
    assert all(e["resumed_from_step"] == e["step"] // 10 * 10 for e in events)  # the newest checkpoint
    # Rolling back and replaying without the bad batch is the same optimization as skipping it.
    roll_model = openclaw.load_model(rolled.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(roll_model.state_dict().values(), skip_model.state_dict().values()))
    steps = [m.step for m in client.get_metric_history(rolled.run_id, "train/loss")]
    assert steps == sorted(set(steps))  # the rolled-back steps were not logged twice


def test_fail_names_the_step(ray_local, poisoned, tmp_path, mlflow_uri):
    cfg = _cfg(poisoned, tmp_path, mlflow_uri, "fail", "fail")
    first_bad = _bad_steps(cfg)[0]
    with pytest.raises(NonFiniteLossError, match=f"global step {first_bad} "):
        openclaw.train(cfg)
    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("openclaw")
                                                .experiment_id])[0]
    assert run.info.status == "FAILED"


def test_a_nonfinite_loss_under_fail_ends_the_run_at_its_first_attempt_whatever_the_budgets(ray_local, poisoned,
                                                                                            tmp_path, mlflow_uri,
                                                                                            capsys):
    """The replay from the checkpoint meets the same NaN: the run was restarted until `max_same_error` (two
    attempts) or `max_failures` ran out, and for ever with neither."""
    cfg = _cfg(poisoned, tmp_path, mlflow_uri, "fail", "same-error")
    cfg = openclaw.load_config(None, {"failure.max_failures": -1, "failure.max_same_error": 0}, base=cfg.resolved())
    first_bad = _bad_steps(cfg)[0]
    with pytest.raises(NonFiniteLossError, match=f"global step {first_bad} "):
        openclaw.train(cfg)
    assert "giving up: a retry would fail alike: NonFiniteLossError" in capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("openclaw").experiment_id],
                             filter_string="attributes.run_name = 'same-error'")[0]
    attempts = [e["event"] for e in _events(client, run.info.run_id, tmp_path) if e["event"] in ("start", "restart")]
    assert attempts == ["start"] and run.info.status == "FAILED"


def test_a_nonfinite_loss_that_recurs_after_a_rollback_in_bf16_switches_the_run_to_fp32(ray_local, poisoned,
                                                                                      tmp_path, mlflow_uri):
    cfg = _cfg(poisoned, tmp_path, mlflow_uri, "rollback", "bf16-rollbacks")
    cfg = openclaw.load_config(None, {"train.precision": "bf16"}, base=cfg.resolved())
    bad = _bad_steps(cfg)
    result = openclaw.train(cfg)
    assert result.metrics["step"] == STEPS
    client = MlflowClient(mlflow_uri)
    events = _events(client, result.run_id, tmp_path)
    rollbacks = [e["step"] for e in events if e["event"] == "nonfinite_loss" and e["action"] == "rollback"]
    assert rollbacks == bad
    # Once, at the first checkpoint after the second rollback (the first is replayed without its batch).
    switches = [e for e in events if e["event"] == "precision_switch"]
    assert len(switches) == 1, switches
    assert switches[0]["previous"] == "bf16" and switches[0]["precision"] == "fp32"
    assert switches[0]["step"] == (bad[1] // 10 + 1) * 10 and "bf16_max_rollbacks" in switches[0]["cause"]
    state = torch.load(f"{result.checkpoint}/state.pt", weights_only=True)  # kept for every later attempt
    assert state["precision"] == state["precision_switched_to"] == "fp32"
