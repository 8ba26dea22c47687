"""A run's events are readable while it runs (from their parts) and after (from `events.json`); the console line
of an attempt names its mesh."""
import json
import os
import re

import pytest
from mlflow.tracking import MlflowClient

import openclaw
from openclaw.tracking.writer import EVENTS_FILE, MlflowWriter, mesh_words


def test_events_are_read_in_order_while_the_run_goes_on_and_match_events_json_at_the_end(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("events")).info.run_id
    first = MlflowWriter(uri, run_id)
    first.apply("attempt", {"world_size": 2, "resumed_from_step": 0, "max_steps": 10, "accumulation": 1}, 100.0)
    first.apply("events", [["checkpoint", {"step": 5}, 101.0], ["checkpoint_requested", {"step": 7}, 102.0]])
    live = openclaw.events(run_id, tracking_uri=uri)
    assert [(e["event"], e["t"]) for e in live] == [("start", 100.0), ("checkpoint", 101.0),
                                                    ("checkpoint_requested", 102.0)]
    assert "Downloading artifacts" not in capfd.readouterr().err  # MLflow drew a bar per read on the caller's stderr
    assert EVENTS_FILE not in {a.path for a in client.list_artifacts(run_id)}  # not yet: the run goes on

    # A new driver resumes the run: its writer reads the events so far and appends after them.
    again = MlflowWriter(uri, run_id)
    again.apply("attempt", {"world_size": 1, "resumed_from_step": 5, "max_steps": 10, "accumulation": 2}, 200.0)
    again.write_events_file()
    events = openclaw.events(run_id, tracking_uri=uri)
    assert [e["event"] for e in events] == ["start", "checkpoint", "checkpoint_requested", "resize"]
    assert events[-1]["previous_world_size"] == 2
    saved = json.load(open(client.download_artifacts(run_id, EVENTS_FILE, str(tmp_path))))
    assert saved == events


def test_a_run_from_before_parts_reads_its_events_json_and_a_run_without_events_reads_none(tmp_path):
    from openclaw.tracking.writer import read_events
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("events")
    old, empty = (client.create_run(experiment).info.run_id for _ in range(2))
    logged = [{"event": "start", "t": 1.0, "world_size": 2}, {"event": "checkpoint", "t": 2.0, "step": 5}]
    client.log_text(old, json.dumps(logged), EVENTS_FILE)
    assert read_events(client, old) == logged
    assert read_events(client, empty) == []
    # Resumed by a writer with parts: its events.json was ignored once a part was there, and written over
    # without the run's first events at the end.
    resumed = MlflowWriter(uri, old)
    resumed.apply("attempt", {"world_size": 2, "resumed_from_step": 5, "max_steps": 10, "accumulation": 1}, 3.0)
    assert [e["event"] for e in read_events(client, old)] == ["start", "checkpoint", "resume"]
    resumed.write_events_file()
    assert [e["event"] for e in read_events(client, old)] == ["start", "checkpoint", "resume"]
    saved = json.load(open(client.download_artifacts(old, EVENTS_FILE, str(tmp_path))))
    assert [e["event"] for e in saved] == ["start", "checkpoint", "resume"]


def test_the_start_line_names_the_mesh_unless_every_worker_is_a_replica():
    mesh = lambda pipeline=1, replicate=1, shard=1, tensor=1: dict(pipeline=pipeline, replicate=replicate,  # noqa: E731
                                                                   shard=shard, tensor=tensor)
    assert mesh_words(mesh(replicate=64)) == "" and mesh_words(mesh()) == "" and mesh_words(None) == ""
    assert mesh_words(mesh(shard=2)) == " (mesh shard 2)"
    assert mesh_words(mesh(tensor=2)) == " (mesh tensor 2)"
    assert mesh_words(mesh(replicate=2, shard=2)) == " (mesh replicate 2 x shard 2)"
    assert mesh_words(mesh(pipeline=4, shard=4, tensor=4)) == " (mesh pipeline 4 x shard 4 x tensor 4)"


def test_a_resume_reopens_its_own_run_and_refuses_another_store(tmp_path):
    """A resume whose tracking URI was another store (MLFLOW_TRACKING_URI unset in a new shell: the default
    sqlite file) created a second MLflow run and rewrote the job file, leaving the first run behind; any
    error from get_run did the same."""
    from conftest import sqlite_store
    from openclaw.errors import ConfigError
    from openclaw.tracking.run import open_run
    config = openclaw.load_config(None, {"name": "once"}, base={"data": {"train": "x"}})
    first, other = sqlite_store(tmp_path / "a.db"), sqlite_store(tmp_path / "b.db")
    run_id, _, resumed = open_run(config, first, str(tmp_path / "runs"))
    assert not resumed and open_run(config, first, str(tmp_path / "runs"))[:3:2] == (run_id, True)
    with pytest.raises(ConfigError, match=re.escape(f"recorded in MLflow at {first} (run {run_id}), not at {other}")):
        open_run(config, other, str(tmp_path / "runs"))
    assert MlflowClient(other).search_runs([e.experiment_id for e in MlflowClient(other).search_experiments()]) == []
    MlflowClient(first).delete_run(run_id)  # a run the user deleted: the job starts a new one
    again, _, resumed = open_run(config, first, str(tmp_path / "runs"))
    assert again != run_id and not resumed


def test_a_run_whose_opening_failed_halfway_is_reopened_not_doubled(tmp_path, monkeypatch):
    """The job file was written last: a server error (or Ctrl-C) after the run was created, while its
    params and config were logged, left a RUNNING run no job file named, and the next command created a
    second run for the job. The job's run is now recorded as it is created, and finished on the reopen."""
    from conftest import sqlite_store
    from openclaw.tracking.run import open_run
    config = openclaw.load_config(None, {"name": "halfway"}, base={"data": {"train": "x"}})
    uri, storage = sqlite_store(tmp_path / "m.db"), str(tmp_path / "runs")
    real, failed = MlflowClient.log_dict, []

    def log_dict_once_unavailable(self, *args, **kwargs):
        if not failed:
            failed.append(args)
            raise ConnectionError("503 Service Unavailable")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "log_dict", log_dict_once_unavailable)
    with pytest.raises(ConnectionError):
        open_run(config, uri, storage)
    run_id, experiment_id, resumed = open_run(config, uri, storage)
    client = MlflowClient(uri)
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id] and not resumed
    run = client.get_run(run_id)
    assert run.data.params["name"] == "halfway" and "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    assert open_run(config, uri, storage)[:3:2] == (run_id, True)  # opened whole: a resume from now on
    # Failed halfway again, then reopened with a key changed: the params it has keep their values
    # (MLflow refuses to change one, and the job could not go on).
    from openclaw.tracking.job_file import _read_job_file, _write_job_file
    _write_job_file(storage, "halfway", {**_read_job_file(storage, "halfway"), "opened": False})
    changed = openclaw.load_config(None, {"name": "halfway", "train.max_steps": 7}, base={"data": {"train": "x"}})
    assert open_run(changed, uri, storage)[:3:2] == (run_id, False)
    assert client.get_run(run_id).data.params["train.max_steps"] == str(config.train.max_steps)


def test_a_job_file_is_whole_after_a_kill_mid_write_and_a_damaged_one_is_refused(tmp_path):
    """The job file was rewritten in place: a driver killed in the write (`ray job stop` SIGKILLs 3 s after
    its SIGTERM) left it empty, which read as no job at all: the next run started a second MLflow run,
    passed the finished and unsent-spool checks, and `record_finished` wrote it back without the run id."""
    import signal

    from openclaw.errors import ConfigError
    from openclaw.tracking.job_file import _read_job_file, _write_job_file, job_record
    storage = str(tmp_path / "runs")
    job = {"mlflow_run_id": "a" * 32, "experiment_id": "1", "finished": {"step": 1000, "metrics": {"x": 0.1}},
           "pad": "x" * 200_000}  # a write long enough to be cut
    _write_job_file(storage, "job", job)
    for kill in range(30):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a driver rewriting the file, saying so after each write
            os.close(read)
            while True:
                _write_job_file(storage, "job", job)
                os.write(write, b".")
        os.close(write)
        os.read(read, 1 + kill % 3)  # killed in its next write (or between two)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        assert _read_job_file(storage, "job") == job, kill
    (tmp_path / "runs" / "job" / "openclaw_job.json").write_text("")  # damaged some other way
    config = openclaw.load_config(None, {"name": "job"}, base={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="openclaw_job.json cannot be read .* Delete it to start the job 'job' in a "
                                          "new MLflow run, or use a new `name`"):
        job_record(config, storage)


def test_a_run_with_an_unsent_spool_is_not_resumed_until_it_is_uploaded(tmp_path):
    """A resume went on while an earlier session's spool waited; uploaded afterwards, its `restore` op hid
    every spooled step below the newer session's last, and its `end KILLED` set the finished run back. A
    spool holding its run line alone was refused too, and `sync-spool` refuses one with nothing to upload:
    the job could not go on at all."""
    from conftest import sqlite_store
    from openclaw.errors import ConfigError
    from openclaw.launch.ending import spool_path
    from openclaw.launch.session import RunSession
    from openclaw.tracking.run import open_run
    config = openclaw.load_config(None, {"name": "spooled", "checkpoint.storage": str(tmp_path / "runs"),
                                        "tracking.uri": sqlite_store(tmp_path / "m.db")},
                                  base={"data": {"train": "x"}})
    session = RunSession(config)
    run_id, _, _ = open_run(config, session.uri, session.storage)
    session._refuse_an_unsent_spool()  # nothing spooled
    spool = spool_path(session.run_dir, run_id)
    with open(spool, "w") as f:
        f.write(json.dumps({"op": "run", "args": [session.uri, run_id]}) + "\n")
    session._refuse_an_unsent_spool()  # its run line alone (a kill mid-append): nothing to upload
    with open(spool, "a") as f:
        f.write(json.dumps({"op": "end", "args": ["KILLED"]}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"upload them first (`openclaw sync-spool {spool}`)")):
        session._refuse_an_unsent_spool()


def test_a_spool_line_a_crash_cut_short_is_dropped_and_the_file_stays_readable(tmp_path):
    """A tracking actor killed mid-append left half a line: `read_spool` refused the whole file, the next
    append continued that half line, and the run could neither upload its spool nor resume past it. A
    kill between creating the file and its `run` line made every later append skip that line."""
    from openclaw.tracking.spool import append_ops, read_spool
    spool = tmp_path / "run.spool.jsonl"
    append_ops(str(spool), "http://u:pw@host:5000", "r1", [("metrics", ([["train/loss", 1.0, 0, 10]],))])
    with open(spool, "ab") as f:
        f.write(b'{"op": "metrics", "args": [[["train/loss", 0.5, 0, ')  # the kill
    assert read_spool(str(spool)) == (("http://host:5000", "r1"), [{"op": "metrics", "args": [[["train/loss", 1.0, 0, 10]]]}])
    append_ops(str(spool), "http://host:5000", "r1", [("end", ("KILLED",))])
    append_ops(str(spool), "http://host:5000", "r1", [("end", ("FAILED",))])
    assert [op["op"] for op in read_spool(str(spool))[1]] == ["metrics", "end", "end"]
    assert spool.read_bytes().count(b"\n") == 4 and oct(spool.stat().st_mode)[-3:] == "600"
    whole = tmp_path / "whole.jsonl"  # cut just before its newline: whole, kept
    whole.write_bytes(b'{"op": "run", "args": ["http://host", "r2"]}\n{"op": "end", "args": ["KILLED"]}')
    append_ops(str(whole), "http://host", "r2", [("end", ("FAILED",))])
    assert [op["args"] for op in read_spool(str(whole))[1]] == [["KILLED"], ["FAILED"]]
    empty = tmp_path / "empty.jsonl"
    empty.touch()  # created, then killed before its first line
    append_ops(str(empty), "http://host", "r3", [("end", ("KILLED",))])
    assert read_spool(str(empty)) == (("http://host", "r3"), [{"op": "end", "args": ["KILLED"]}])


def test_the_drivers_ending_goes_into_a_spool_a_crash_left_empty_with_its_run_line(tmp_path):
    """A tracking actor killed between creating its spool and writing the `run` line left an empty file;
    the driver's `end` or `finish` then went in without one, and the file could never be uploaded."""
    from openclaw.launch.ending import spool_path
    from openclaw.launch.session import RunSession
    from openclaw.tracking.spool import read_spool
    config = openclaw.load_config(None, {"name": "empty", "checkpoint.storage": str(tmp_path / "runs"),
                                        "tracking.uri": "http://127.0.0.1:9"}, base={"data": {"train": "x"}})
    session = RunSession(config)
    session.run_id = "1" * 32
    spool = spool_path(session.run_dir, session.run_id)
    os.makedirs(os.path.dirname(spool), exist_ok=True)
    open(spool, "w").close()
    session._spool_ending(spool, "KILLED", None)
    assert read_spool(spool) == (("http://127.0.0.1:9", "1" * 32), [{"op": "end", "args": ["KILLED"]}])


def test_sync_spool_logs_the_model_without_its_data_and_writes_events_json(tmp_path):
    """The spool's `finish` resolved the training data only for an input example: data moved since (or on
    a store whose keys the spooled config holds as ***) failed it, leaving the run RUNNING without its
    model; and sync-spool never wrote the `events.json` a run's own end writes."""
    import torch
    from conftest import sqlite_store
    from openclaw.engine import checkpoint as ckpt_io
    from openclaw.engine.models import build_model
    from openclaw.tracking.spool import append_ops
    from openclaw.tracking.writer import sync_spool
    uri = sqlite_store(tmp_path / "m.db")
    kwargs = {"in_features": 8, "hidden": 16, "depth": 1, "num_classes": 4}
    config = openclaw.load_config(None, {"model": {"name": "mlp", "kwargs": kwargs}},
                                  base={"data": {"train": str(tmp_path / "moved-away")}}).resolved()
    ckpt = ckpt_io.save(tmp_path / "ckpt", model=build_model("mlp", kwargs).state_dict(), trainer={},
                        state={"step": 5}, config=config)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("spooled")).info.run_id
    spool = str(tmp_path / "spool.jsonl")
    append_ops(spool, uri, run_id, [("event", ("checkpoint", {"step": 5}, 1000.0)), ("finish", (config, str(ckpt)))])
    assert sync_spool(spool, uri) == 2
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and torch.equal(
        openclaw.load_model(run_id, tracking_uri=uri).state_dict()["net.0.weight"],
        openclaw.load_model(str(ckpt)).state_dict()["net.0.weight"])
    assert [e["event"] for e in json.load(open(client.download_artifacts(run_id, "events.json", str(tmp_path))))] \
        == ["checkpoint"]


def test_a_retried_attempt_op_is_recorded_once_under_one_name(tmp_path):
    """The attempt count rose before the event was written: a retry after a failed request turned a
    'resume' into a 'restart', and wrote a second part under it."""
    from conftest import sqlite_store
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("attempts")).info.run_id
    MlflowWriter(uri, run_id).apply("attempt", {"world_size": 2, "resumed_from_step": 0, "max_steps": 100,
                                                "accumulation": 1}, 1000.0)
    writer = MlflowWriter(uri, run_id)  # a new driver: its first attempt is a resume
    real, failed = writer.client.set_tag, []

    def set_tag_once_unreachable(*args):
        if not failed:
            failed.append(args)
            raise ConnectionError("the server went away")
        return real(*args)
    writer.client.set_tag = set_tag_once_unreachable
    fields = {"world_size": 2, "resumed_from_step": 50, "max_steps": 100, "accumulation": 1}
    with pytest.raises(ConnectionError):
        writer.apply("attempt", fields, 2000.0)
    writer.apply("attempt", fields, 2000.0)  # the service retries the op
    assert [(e["event"], e["resumed_from_step"]) for e in openclaw.events(run_id, tracking_uri=uri)] == [
        ("start", 0), ("resume", 50)]


def _session_with_its_server_gone(tmp_path, monkeypatch, name: str, run_id: str):
    """A job's session whose MLflow server is a loopback port nothing listens on, and that URI."""
    import socket

    from openclaw.launch.session import RunSession
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = openclaw.load_config(None, {"name": name, "checkpoint.storage": str(tmp_path / "runs"),
                                        "tracking.uri": gone}, base={"data": {"train": "x"}})
    session = RunSession(config)
    session.run_id = run_id
    return session, gone


def test_a_server_gone_between_the_flush_and_the_end_leaves_the_ending_in_the_spool(tmp_path, monkeypatch, capsys):
    """Everything was delivered, then the server went away before the final model and the FINISHED status:
    those were only printed about, and the run stayed RUNNING with nothing sync-spool could carry out."""

    from openclaw.launch.ending import spool_path
    from openclaw.tracking.spool import read_spool
    session, gone = _session_with_its_server_gone(tmp_path, monkeypatch, "late", "0" * 32)
    session._end_mlflow_run("FINISHED", str(tmp_path / "runs" / "late" / "checkpoint_x"))
    spool = spool_path(session.run_dir, session.run_id)
    (uri, run_id), ops = read_spool(spool)
    assert (uri, run_id) == (gone, "0" * 32) and [op["op"] for op in ops] == ["finish"]
    assert ops[0]["args"][1].endswith("checkpoint_x") and f"openclaw sync-spool {spool}" in capsys.readouterr().err


def test_a_flush_that_times_out_waits_for_the_request_in_flight_and_spools_only_what_is_left(tmp_path, monkeypatch):
    """The flush copied the queue while the service's thread was still sending its head: a slow server
    that then took the request kept those events twice, in MLflow and in the spool (`sync-spool` wrote
    them again). The flush now waits for the request in flight and spools only what it did not deliver."""
    import threading

    from conftest import sqlite_store
    from openclaw.tracking.service import TrackingService
    from openclaw.tracking.spool import read_spool
    from openclaw.tracking.writer import read_events
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("flush")).info.run_id
    sending, real = threading.Event(), MlflowWriter.apply
    service: list[TrackingService] = []

    def slow_apply(self, op, *args):  # the server answers once the flush has given up on it
        sending.set()
        while not service[0]._closed:
            threading.Event().wait(0.01)
        return real(self, op, *args)
    monkeypatch.setattr(MlflowWriter, "apply", slow_apply)
    service.append(TrackingService(uri, run_id, None, str(tmp_path / "spool.jsonl")))
    service[0].submit("event", "checkpoint", {"step": 10}, 1000.0)
    service[0].submit("event", "first_step", {"step": 11}, 1001.0)
    assert sending.wait(60)
    service[0].submit("end", "FINISHED")  # queued behind the batch in flight
    outcome = service[0].flush(timeout_s=0.1)
    assert [e["event"] for e in read_events(client, run_id)] == ["checkpoint", "first_step"]
    assert outcome["delivered"] is False and [op["op"] for op in read_spool(outcome["spool"])[1]] == ["end"]


def test_a_spool_keeps_every_op_where_one_holds_a_value_json_has_no_type_for(tmp_path):
    """Each op was encoded as it was written: a numpy number in an event raised halfway, the spool held its
    `run` line alone, and the ops after it (the run's queued metrics) were lost."""
    import numpy as np

    from openclaw.tracking.spool import append_ops, read_spool
    spool = str(tmp_path / "spool.jsonl")
    append_ops(spool, "http://host:5000", "r1", [("metrics", ([["train/loss", 1.5, 0, 10]],)),
                                                 ("event", ("checkpoint", {"step": np.int64(10), "ranks": np.arange(2),
                                                                           "path": tmp_path}, 1000.0)),
                                                 ("end", ("KILLED",))])
    _, ops = read_spool(spool)
    assert [op["op"] for op in ops] == ["metrics", "event", "end"]
    assert ops[1]["args"][1] == {"step": 10, "ranks": [0, 1], "path": str(tmp_path)}


def test_a_spooled_restart_is_uploaded_as_a_restart_not_a_resume(tmp_path, monkeypatch):
    """`sync-spool`'s writer counted the session's attempts from 0: a restart the spool kept, after the
    session's start reached MLflow, was recorded as a resume (a new driver). The spool now says how many
    attempts the session had recorded before its ops."""
    import threading

    from conftest import sqlite_store
    from openclaw.tracking.service import TrackingService
    from openclaw.tracking.writer import read_events, sync_spool
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("spooled")).info.run_id
    real, delivered, away = MlflowWriter.apply, threading.Event(), []

    def apply(self, op, *args):
        if away:
            raise ConnectionError("the server went away")
        real(self, op, *args)
        delivered.set()
    monkeypatch.setattr(MlflowWriter, "apply", apply)
    service = TrackingService(uri, run_id, None, str(tmp_path / "spool.jsonl"))
    fields = {"world_size": 2, "resumed_from_step": 0, "max_steps": 10, "accumulation": 1}
    service.submit("attempt", fields, 1000.0)
    assert delivered.wait(60)
    away.append(True)
    service.submit("attempt", {**fields, "resumed_from_step": 5}, 2000.0)
    outcome = service.flush(timeout_s=0.5)
    monkeypatch.setattr(MlflowWriter, "apply", real)
    assert sync_spool(outcome["spool"], uri) == 1
    assert [(e["event"], e["resumed_from_step"]) for e in read_events(client, run_id)] == [("start", 0), ("restart", 5)]


def test_a_resumed_session_adds_no_second_point_to_the_data_metrics(tmp_path, digits_dir):
    """Every session logged the data's metrics at step 0: a resumed run's `data/train/cache_hit` held 0 then
    1 at the same step. The first session's stay; a resumed one's cache is in the run's tags."""
    from conftest import sqlite_store
    from openclaw.data.prep import Prepared
    from openclaw.data.sources import resolve
    from openclaw.tracking.lineage import log_lineage
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("lineage")).info.run_id
    source = resolve(str(digits_dir / "train"), "data.train")
    log_lineage(uri, run_id, {"train": Prepared(source, source, cache="miss", prepare_s=12.5)})
    log_lineage(uri, run_id, {"train": Prepared(source, source, cache="hit")}, resumed=True)
    history = client.get_metric_history(run_id, "data/train/cache_hit")
    assert [(m.step, m.value) for m in history] == [(0, 0.0)]
    assert [m.value for m in client.get_metric_history(run_id, "data/train/prepare_s")] == [12.5]
    assert client.get_run(run_id).data.tags["openclaw.data.train.cache"] == "hit"


def test_a_deleted_experiment_is_named_with_what_to_do(tmp_path):
    """A `tracking.experiment` deleted in MLflow failed the run's opening with MLflow's own error, which
    says neither the key nor how to go on."""
    from conftest import sqlite_store
    from openclaw.errors import ConfigError
    from openclaw.tracking.run import open_run
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    config = openclaw.load_config(None, {"name": "job", "tracking.experiment": "gone"}, base={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match=r"`tracking.experiment` \('gone'\) is deleted in MLflow .*mlflow "
                                          r"experiments restore --experiment-id \d+"):
        open_run(config, uri, str(tmp_path / "runs"))


def test_a_failed_runs_ending_joins_a_spool_that_waits_and_is_said_where_none_does(tmp_path, monkeypatch, capsys):
    """A failed or stopped run whose server was away at its end stayed RUNNING in MLflow without a word: the
    error was swallowed. Where its spool waits for `sync-spool` anyway, the ending now joins it; where none
    does, the run is said to stay RUNNING until it is resumed."""

    from openclaw.launch.ending import spool_path
    from openclaw.tracking.spool import append_ops, read_spool
    session, gone = _session_with_its_server_gone(tmp_path, monkeypatch, "failed", "1" * 32)
    spool = spool_path(session.run_dir, session.run_id)
    session._end_mlflow_run("FAILED", None)
    assert not os.path.exists(spool)
    said = capsys.readouterr().err
    assert f"could not mark MLflow run {session.run_id} FAILED" in said and "stays RUNNING there until" in said
    append_ops(spool, gone, session.run_id, [("metrics", ([],))])  # the flush spooled what it could not send
    session._end_mlflow_run("KILLED", None)
    assert [(op["op"], op["args"]) for op in read_spool(spool)[1]] == [("metrics", [[]]), ("end", ["KILLED"])]
    assert f"openclaw sync-spool {spool}" in capsys.readouterr().err


def test_an_op_that_comes_after_the_flush_is_spooled_not_dropped(tmp_path):
    """The service's thread ends at the flush: an op queued after it (an actor call a worker sent as the run
    ended, run after the flush's) was kept in a queue nothing would send, and lost without a word."""
    from conftest import sqlite_store
    from openclaw.tracking.service import TrackingService
    from openclaw.tracking.spool import read_spool
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("late")).info.run_id
    service = TrackingService(uri, run_id, None, str(tmp_path / "spool.jsonl"))
    assert service.flush(timeout_s=30)["delivered"]
    service.submit("event", "checkpoint", {"step": 10}, 1000.0)
    assert [(op["op"], op["args"][1]) for op in read_spool(str(tmp_path / "spool.jsonl"))[1]] == [
        ("event", {"step": 10})]


def test_an_op_no_request_can_carry_is_set_aside_and_the_rest_delivered(tmp_path):
    """An op MLflow's client could not encode (a numpy number in a metric) was taken for a server away:
    retried until the flush's deadline, with every later op waiting behind it, and 'not answering' said."""
    import numpy as np

    from conftest import sqlite_store
    from openclaw.tracking.service import TrackingService
    from openclaw.tracking.spool import read_spool
    uri = sqlite_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("poison")).info.run_id
    service = TrackingService(uri, run_id, None, str(tmp_path / "spool.jsonl"))
    service.submit("params", {"a": object()})  # the writer's str() takes it: delivered
    service.submit("event", "checkpoint", {"step": np.int64(10)}, 1000.0)  # MLflow's json.dumps does not
    service.submit("metrics", [{"key": "train/loss", "value": 1.5, "timestamp": 1000, "step": 10}])
    outcome = service.flush(timeout_s=20)
    assert outcome["delivered"] and outcome["refused"] == 1
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.5]
    assert [op["op"] for op in read_spool(outcome["dead_letter"])[1]] == ["event"]
