"""Tracking against a real `mlflow server` process on loopback that goes away mid-run: training does not
wait for it, and no metric is lost, whether the server comes back or not."""
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import openclaw
from conftest import MlflowServer, digits_config
from openclaw.advice.facts import WINDOW_KEYS
from openclaw.advice.report import advise_logged_run
from openclaw.data.sampler import position_of
from openclaw.data.sources import resolve
from openclaw.engine.optim import lr_at
from openclaw.tracking.model import LINKED_METRICS
from openclaw.tracking.run import metric_histories

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    srv.root.mkdir()
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def test_a_60_s_tracking_outage_neither_stops_training_nor_loses_a_metric(ray_local, digits_dir, tmp_path, server):
    steps, every = 16_000, 400
    cfg = digits_config(digits_dir, tmp_path, server.uri, name="outage", **{
        "train.max_steps": steps, "train.log_every": 20, "train.eval_every": 0, "checkpoint.every_steps": every,
        "checkpoint.keep": steps // every})  # Ray Train then keeps every checkpoint's report (see below)
    outage: dict[str, float] = {}

    def take_the_server_away():
        run_dir = tmp_path / "runs" / "outage"
        if not _first_checkpoint(run_dir):
            return  # the run failed first: its own error says why
        server.stop()
        outage["down"] = time.time()
        time.sleep(60)  # the outage itself, as the issue specifies: not a synchronization
        outage["restart"] = time.time()
        server.start()  # (seconds of the machine's CPU, on the test's account)
        outage["up"] = time.time()

    chaos = threading.Thread(target=take_the_server_away, daemon=True)
    chaos.start()
    result = openclaw.train(cfg)
    chaos.join()
    assert result.metrics["step"] == steps and "up" in outage  # (the outage's windows: `_kept_its_pace`)

    client = MlflowClient(server.uri)
    history = {k: client.get_metric_history(result.run_id, k) for k in client.get_run(result.run_id).data.metrics}
    _every_key_at_every_step_once(history, steps, every)
    checked = _values_as_the_workers_logged_them({k: {m.step: m.value for m in h} for k, h in history.items()},
                                                 cfg, tmp_path / "runs" / "outage", steps, every)
    unchecked = set(history) - checked
    assert all(k in TIMED or k.startswith("system/") for k in unchecked), sorted(unchecked)
    _kept_its_pace(history["train/loss"], outage)
    assert client.get_run(result.run_id).info.status == "FINISHED"


# The values no run logs twice alike, wall-clock times and rates and samples of the machine (with every
# `system/` key): their steps are checked like every key's, their values only where a worker's report to
# Ray Train has them (train/samples_per_s). Every other key's values are checked.
TIMED = {"train/samples_per_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/flops_per_s", "perf/mfu",
         "perf/ingest_rows_per_s", "perf/step_data_s", "perf/step_compute_s", "perf/step_checkpoint_s",
         "perf/data_wait_frac", "perf/checkpoint_stall_s", "perf/peak_memory_bytes", "perf/eval_s"}


def _every_key_at_every_step_once(history, steps, every):
    """Nothing lost, nothing twice: each key the run logs at its first log step (before the outage) has
    every log step exactly once; the checkpoint stall has every checkpoint's step once."""
    # the gradient noise scale is logged only for windows whose estimate is positive: at log steps, once
    noise = {k for k in history if k.startswith("train/grad_noise_scale")}
    for key in noise:
        logged = [m.step for m in history[key]]
        assert len(logged) == len(set(logged)) and set(logged) <= set(range(20, steps + 1, 20)), key
    windowed = {k for k, h in history.items() if min(m.step for m in h) == 20} - noise
    assert windowed >= {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/peak_memory_bytes",
                        "perf/rank0/comm_frac", "perf/straggler_index", "system/node0/cpu_percent"}, sorted(history)
    for key in windowed:
        assert sorted(m.step for m in history[key]) == list(range(20, steps + 1, 20)), key
    assert sorted(m.step for m in history["perf/checkpoint_stall_s"]) == list(range(every, steps + 1, every))
    others = set(history) - windowed - noise - {"perf/checkpoint_stall_s"}  # the data's lineage, the final evaluation
    assert all(len(history[k]) == 1 for k in others), {k: len(history[k]) for k in others}


def _values_as_the_workers_logged_them(at, cfg, run_dir, steps, every) -> set[str]:
    """The values where they are known without MLflow; returns the keys checked. Each checkpoint's report
    to Ray Train carries what the workers logged at its step (train/, the final evaluation; Ray keeps
    the reports of the checkpoints it keeps beside the run), and the LR, epoch, batch, state sizes and
    row counts are functions of the step and the data."""
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    reports = {r["metrics"]["step"]: r["metrics"] for r in snapshot["checkpoint_results"]}
    assert sorted(reports) == list(range(every, steps + 1, every))  # before, during and after the outage
    for step, reported in reports.items():
        logged = {k: v for k, v in reported.items() if k not in ("step", "perf/wall_step_s")}  # (the run's end)
        assert {k: at[k][step] for k in logged} == logged, step
    rows = {k: resolve(getattr(cfg.data, k), f"data.{k}").num_rows for k in ("train", "val")}
    for step in range(20, steps + 1, 20):  # the values of the step's last batch (step - 1, counted from 0)
        assert at["train/lr"][step] == lr_at(step - 1, cfg.train.optimizer.lr, cfg.train.schedule, steps), step
        assert at["train/epoch"][step] == position_of(step - 1, rows["train"], 64).epoch, step
        assert (at["train/global_batch_size"][step], at["train/skipped_batches"][step]) == (64, 0), step
    constant = {k for k in at if k.endswith("_bytes_per_rank")} | {"perf/time_to_first_step_s"}
    assert all(len(set(at[k].values())) == 1 for k in constant)  # set once: the same value at every step
    assert {k: v for k, v in at.items() if k.startswith("data/")} == {
        f"data/{k}/{m}": {0: float(rows[k]) if m == "rows" else 0.0} for k in rows for m in ("rows", "skipped_shards")}
    return {k for r in reports.values() for k in r} | constant | {k for k in at if k.startswith("data/")} | {
        "train/lr", "train/epoch", "train/global_batch_size", "train/skipped_batches"}


def _first_checkpoint(run_dir, timeout_s: float = 300) -> bool:
    """Whether the run wrote its first checkpoint within `timeout_s` (polled: a run that failed first must
    not leave this thread spinning, and pytest waiting on it)."""
    deadline = time.monotonic() + timeout_s
    while not any(run_dir.glob("checkpoint_*/manifest.json")):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kept_its_pace(history, outage):
    """Training went on at its pace while the server was down: the median rate of the logging windows
    (20 steps, timed by the workers' clocks) of the outage is at least 0.8 x the median of the windows
    before and after it (the server's restart, the test's work, is in neither)."""
    t = {m.step: m.timestamp / 1000 for m in history}
    windows = [(t[s - 20], t[s]) for s in sorted(t) if s - 20 in t]
    rate = lambda ws: statistics.median(20 / (b - a) for a, b in ws)  # noqa: E731  (steps/s)
    inside = [(a, b) for a, b in windows if outage["down"] <= a and b <= outage["restart"]]
    outside = [(a, b) for a, b in windows if b < outage["down"] or a > outage["up"]]
    assert len(inside) >= 20 and len(outside) >= 10, (len(inside), len(outside))  # (steps 20 to 400 before it)
    assert rate(inside) >= 0.8 * rate(outside), (rate(inside), rate(outside), len(inside), len(outside))


def test_a_server_that_never_returns_leaves_a_spool_that_uploads_later(ray_local, digits_dir, tmp_path, server,
                                                                       capsys):
    steps = 3000
    cfg = digits_config(digits_dir, tmp_path, server.uri, name="gone", **{
        "train.max_steps": steps, "train.log_every": 20, "train.eval_every": 0, "checkpoint.every_steps": 200,
        "tracking.flush_timeout_s": 5})
    run_dir = tmp_path / "runs" / "gone"

    def take_the_server_away():
        if _first_checkpoint(run_dir):
            server.stop()

    chaos = threading.Thread(target=take_the_server_away, daemon=True)
    chaos.start()
    result = openclaw.train(cfg)
    chaos.join()
    assert result.metrics["step"] == steps
    err = capsys.readouterr().err
    assert f"MLflow at {server.uri} did not answer" in err and "openclaw sync-spool" in err
    spool = err.split("openclaw sync-spool ")[1].split()[0]
    assert Path(spool).parent == run_dir

    server.start()
    r = subprocess.run([sys.executable, "-m", "openclaw.cli", "sync-spool", spool], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "uploaded" in r.stdout, r.stderr
    steps_logged = sorted(m.step for m in MlflowClient(server.uri).get_metric_history(result.run_id, "train/loss"))
    assert steps_logged == list(range(20, steps + 1, 20))
    # The run did not wait at its end for the server; sync-spool logged its model and closed it.
    assert "also logs it to MLflow and closes the run" in err
    assert MlflowClient(server.uri).get_run(result.run_id).info.status == "FINISHED"
    reloaded, trained = openclaw.load_model(result.run_id, tracking_uri=server.uri), openclaw.load_model(result.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), trained.state_dict().values()))


def test_a_basic_auth_server_works_with_the_standard_credentials(ray_local, digits_dir, tmp_path, monkeypatch):
    root = tmp_path / "auth-server"
    root.mkdir()
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'users.db'}\nadmin_username = admin\n"
                   "admin_password = s3cret-Pass-1234\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    srv = MlflowServer(root, "--app-name", "basic-auth", log=root / "server.log",
                       env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"})
    srv.start()
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        with pytest.raises(Exception, match="401|Unauthorized|credentials"):
            MlflowClient(srv.uri).search_experiments()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-Pass-1234")
        cfg = digits_config(digits_dir, tmp_path, srv.uri, name="auth", **{
            "train.max_steps": 40, "train.log_every": 10, "train.eval_every": 0, "checkpoint.every_steps": 20})
        result = openclaw.train(cfg)
        # Each request costs this server its password hash: the run reads back only the histories its
        # advice is built from and those it links to the logged model, not one per metric of the run.
        reads = (root / "server.log").read_text().count("/metrics/get-history")
        run = MlflowClient(srv.uri).get_run(result.run_id)
        linked = [k for k in run.data.metrics if k.startswith(LINKED_METRICS)]
        assert 0 < reads <= len(WINDOW_KEYS) + len(linked) < len(run.data.metrics), (reads, len(run.data.metrics))
        assert [m.step for m in MlflowClient(srv.uri).get_metric_history(result.run_id, "train/loss")] == [10, 20, 30, 40]
        assert run.info.status == "FINISHED"
    finally:
        srv.stop()


def test_an_op_the_server_refuses_is_set_aside_and_every_other_metric_arrives(ray_local, digits_dir, tmp_path, server,
                                                                              capsys):
    from conftest import RefusingProxy
    # The metrics published with the step-20 checkpoint are refused once (HTTP 400), as MLflow refuses a bad op.
    proxy = RefusingProxy(server.uri, "/runs/log-batch", b'"step": 20')
    try:
        _refused_op_test(proxy, server, digits_dir, tmp_path, capsys)
    finally:
        proxy.close()


def _refused_op_test(proxy, server, digits_dir, tmp_path, capsys):
    from openclaw.tracking.writer import sync_spool
    cfg = digits_config(digits_dir, tmp_path, proxy.uri, name="refused", **{
        "train.max_steps": 60, "train.log_every": 10, "train.eval_every": 0, "checkpoint.every_steps": 20})
    result = openclaw.train(cfg)
    assert result.metrics["step"] == 60 and len(proxy.refused) == 1
    client = MlflowClient(server.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert steps == [30, 40, 50, 60]  # 10 and 20 went in the refused batch; nothing after it was held up
    dead = tmp_path / "runs" / "refused" / f"tracking-deadletter-{result.run_id}.jsonl"
    assert f"refused 1 tracking update(s); they are kept in {dead}" in capsys.readouterr().err
    assert oct(dead.stat().st_mode & 0o777) == "0o600"
    # Once the cause is gone, the set-aside op is sent again like a spool's (to the server it was refused by).
    assert sync_spool(str(dead), proxy.uri) == 1
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert steps == [10, 20, 30, 40, 50, 60]
    # Through the server, the advice reads each history (8 requests at a time, in key order) and the events
    # (their parts in one download), as `events.json` has them.
    keys = sorted(client.get_run(result.run_id).data.metrics)
    points = lambda history: [(m.key, m.step, m.value, m.timestamp) for m in history]  # noqa: E731
    assert [points(h) for h in metric_histories(client, result.run_id, keys)] == [
        points(client.get_metric_history(result.run_id, k)) for k in keys]
    assert openclaw.events(result.run_id, tracking_uri=server.uri) == json.load(
        open(client.download_artifacts(result.run_id, "events.json", str(tmp_path))))
    _, facts, source = advise_logged_run(result.run_id, server.uri)
    assert facts.samples_per_s and facts.world_size and source.startswith("6 log window(s)"), source
