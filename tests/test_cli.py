"""Bad input: one paragraph naming the file, key or column; exit 2; no traceback unless --debug.
Each case fails in preflight, before Ray or any worker starts, but the last: a bad shard that only the
data's preparation (Ray Data tasks) finds."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "jobs" / "configs" / "digits.yaml"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "openclaw.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _data(digits_dir):
    return ["--set", f"data.train={digits_dir / 'train'}", "--set", f"data.val={digits_dir / 'val'}"]


CASES = {
    "missing dataset": (lambda d, t: [DIGITS, "--set", f"data.train={t / 'missing'}"],
                        "`data.train`: dataset path"),
    "missing column": (lambda d, t: [DIGITS, *_data(d), "--set", "data.features=pixels"],
                       "`data.features`: column 'pixels' is not in"),
    "malformed yaml": (lambda d, t: [_write(t, "name: [x\n")], "is not valid YAML at line"),
    "unknown key": (lambda d, t: [DIGITS, *_data(d), "--set", "train.lr=1"], "unknown key `train.lr`"),
    "wrong type": (lambda d, t: [DIGITS, *_data(d), "--set", "train.max_steps=lots"], "`train.max_steps`"),
    "indivisible batch": (lambda d, t: [DIGITS, *_data(d), "--set", "train.global_batch_size=40"],
                          "must be divisible by `train.micro_batch_size`"),
    "unwritable storage": (lambda d, t: [DIGITS, *_data(d), "--set", f"checkpoint.storage={_write(t, '') / 'runs'}"],
                           "/bad.yaml/runs cannot be written (Not a directory): set it to a folder"),
    "no cluster there": (lambda d, t: [DIGITS, *_data(d), "--address", f"127.0.0.1:{_closed_port()}"],
                         "no Ray cluster answers at 127.0.0.1:"),
    "tensor parallel mlp": (lambda d, t: [DIGITS, *_data(d), "--set", "parallelism.tensor=2"],
                            "`parallelism.tensor` (2) needs a model that says how to split it"),
    "labels past the classes": (lambda d, t: [DIGITS, *_data(d), "--set", "model.kwargs.num_classes=5"],
                                "`data.train`: column 'y' (`data.label`) holds labels from 0 to 9, but the model's "
                                "output width is 5: labels must lie in 0..4. Set `model.kwargs.num_classes` to at "
                                "least 10"),
    "mlp narrower than the data": (lambda d, t: [DIGITS, *_data(d), "--set", "model.kwargs.in_features=10"],
                                   "the built-in 'mlp' cannot run on the data's rows (`data.features` 'x': [64] per "
                                   "row, torch.float32): RuntimeError: a and b must have same reduction dim, but got "
                                   "[2, 64] X "
                                   "[10, 128]. Make `model.kwargs` fit the data (`model.kwargs.in_features`: 64)."),
    "user's model narrower than the data": (
        lambda d, t: [DIGITS, *_data(d), "--set", f"model.name={_user_model(t, 'nn.Linear(32, 10)')}"],
        "the `model.name` 'narrow:build' cannot run on the data's rows (`data.features` 'x': [64] per row, "
        "torch.float32): RuntimeError: a and b must have same reduction dim, but got [2, 64] X [32, 10]. Make the "
        "model or `model.kwargs` fit the data."),
    "fewer eval rows than data-parallel ranks": (
        lambda d, t: [DIGITS, *_data(d), "--set", "train.eval_rows=1"],
        "an evaluation scores 1 row(s) of `data.val`, fewer than the 2 data-parallel ranks it is shared out over: "
        "raise `train.eval_rows`"),
    "a scalar column as an mlp's features": (
        lambda d, t: [DIGITS, "--set", f"data.train={_scalar_features(t)}", "--set", "data.val=null",
                      "--set", "data.features=s"],
        "fit the data (the mlp takes a vector per row: a fixed-size list column as `data.features`)."),
    "a list column as the labels": (lambda d, t: [DIGITS, *_data(d), "--set", "data.features=y", "--set", "data.label=x"],
                                    "holds a list per row (fixed_size_list<element: float>[64]); classification scores "
                                    "one class id per row. Set `data.label` to the class column"),
    "model kwarg not a number": (lambda d, t: [DIGITS, *_data(d), "--set", "model.kwargs.hidden=abc"],
                                 "`model.kwargs.hidden` must be an integer (got 'abc')"),
    "tracking uri scheme typo": (lambda d, t: [DIGITS, *_data(d), "--set", "tracking.uri=htp://127.0.0.1:5000"],
                                 "`tracking.uri`: 'htp://127.0.0.1:5000' has the scheme 'htp', which no MLflow "
                                 "tracking store takes. Use http(s)://HOST:PORT"),
    "the label column is the features": (lambda d, t: [DIGITS, *_data(d), "--set", "data.label=x"],
                                         "`data.label` names the same column as `data.features` ('x'). Set it to "
                                         "the column that holds the targets."),
    "a model argument MLflow cannot name": (
        lambda d, t: [DIGITS, *_data(d), "--set", f"model.name={_user_model(t, 'nn.Linear(64, 10)')}",
                      "--set", "model.kwargs={'a@b': 1}"],
        "`model.kwargs.a@b`: MLflow takes no param of that name"),
    "pipeline of an mlp": (lambda d, t: [DIGITS, *_data(d), "--set", "parallelism.pipeline=2"],
                           "`parallelism.pipeline` (2 stage(s)) needs a model that says how to split it into stages"),
}


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_model(tmp, body: str) -> str:
    """A user's model module in the CLI's working folder (on its import path): `narrow:build`."""
    (tmp / "narrow.py").write_text(f"from torch import nn\n\n\ndef build(**_):\n    return {body}\n")
    return "narrow:build"


def _scalar_features(tmp):
    """A dataset whose feature column `s` holds one number per row (and labels `y`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp / "scalar").mkdir()
    pq.write_table(pa.table({"s": [0.5] * 256, "y": [1] * 256}), tmp / "scalar" / "part-0.parquet")
    return tmp / "scalar"


def _write(tmp, text):
    p = tmp / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_exit_2_without_traceback(case, digits_dir, tmp_path):
    make_args, expected = CASES[case]
    r = run_cli("train", *make_args(digits_dir, tmp_path), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("openclaw: error: ")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://user:pw@mlflow.example", "sqlite:///m.db",
                                 "postgresql+psycopg2://u@db/mlflow", "mysql://db/x", "file:///tmp/mlruns", "mlruns",
                                 "/abs/mlruns", "databricks", "databricks://profile", "htp://127.0.0.1:5000",
                                 "s3://bucket/mlruns", "sqlit:///m.db", "postgres://db/x"])
def test_the_tracking_uri_check_takes_what_mlflows_store_registry_takes(uri):
    """The check's list of schemes against MLflow's own registry (private, read here only): a URI it
    refuses, MLflow would refuse when the run opened; one it takes, MLflow takes."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from openclaw.tracking.run import store_scheme
    try:
        _tracking_store_registry.get_store_builder(uri)
        mlflow_takes = True
    except Exception:
        mlflow_takes = False
    assert (store_scheme(uri) is not None) == mlflow_takes


@pytest.mark.integration  # a real `mlflow server` answers in one case
def test_a_tracking_server_that_does_not_answer_or_a_folder_is_refused_naming_the_key(tmp_path, monkeypatch):
    """An unreachable server was found when the run opened, after Ray started and the data was prepared, and
    MLflow's retries took about 4 minutes, then a traceback with the URI's password. A folder, which
    MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set, failed there too."""
    from conftest import MlflowServer
    from openclaw.errors import ConfigError
    from openclaw.tracking.run import check_tracking_uri
    down = f"http://alice:s3cret@127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match=r"`tracking.uri`: no MLflow server answers at http://127.0.0.1:\d+ ") as e:
        check_tracking_uri(down, "tracking.uri")
    assert "s3cret" not in str(e.value)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"is a folder, which MLflow 3 no longer takes .* sqlite:///PATH"):
        check_tracking_uri(str(tmp_path / "mlruns"), "$MLFLOW_TRACKING_URI")
    server = MlflowServer(tmp_path)
    server.start()
    try:
        check_tracking_uri(server.uri, "tracking.uri")  # a running server answers
    finally:
        server.stop()


SWEEP_LAYOUTS = {
    # each key's values can each be fine while a combination is not: 3 heads over 2 tensor-parallel ranks
    "heads over tensor": ("depth: 2", "", "{parallelism.tensor: {choice: [1, 2]}, model.kwargs.heads: {choice: [6, 3]}}",
                          "gives parallelism.tensor=2, model.kwargs.heads=3, a layout the model cannot take: "
                          "`parallelism.tensor` (2) must divide"),
    # a `choice` of lists: the split that misses the model's 3 blocks
    "pipeline splits": ("depth: 3", "parallelism: {pipeline: 2}", "{parallelism.pipeline_split: {choice: [[2, 1], [2, 2]]}}",
                        "gives parallelism.pipeline_split=[2, 2], a layout the model cannot take: "
                        "`parallelism.pipeline_split` [2, 2] gives 4 block(s)"),
    # a vocabulary the text data's byte ids reach past (checked against the footers' statistics)
    "vocabulary": ("depth: 2", "", "{model.kwargs.vocab_size: {choice: [256, 100]}}",
                   "gives model.kwargs.vocab_size=100, which the data does not fit: `data.train`: column 'x' "
                   "(`data.features`) holds token ids from"),
    # a context the text data's sequences (64 tokens) outgrow: found by the gpt's forward on the meta device
    "context": ("depth: 2", "", "{model.kwargs.block_size: {choice: [128, 32]}}",
                "gives model.kwargs.block_size=32, which the data does not fit: `model.kwargs.block_size` (32) is "
                "shorter than the data's sequences (64 tokens)"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_LAYOUTS))
def test_a_sweep_whose_space_gives_a_layout_the_model_cannot_take_exits_2_before_anything_starts(case, text_dir,
                                                                                                  tmp_path):
    """Every combination of the space's values is checked against the model (and the model's values against
    the data's token ids) before Ray, MLflow or any trial starts."""
    depth, parallelism, space, expected = SWEEP_LAYOUTS[case]
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"""name: sw
model: {{name: gpt, kwargs: {{vocab_size: 256, block_size: 128, dim: 48, {depth}, heads: 6}}}}
task: language_modeling
data: {{train: {text_dir / 'train'}, features: x, label: null}}
train: {{global_batch_size: 8, micro_batch_size: 4, max_steps: 10}}
scaling: {{min_workers: 2, max_workers: 2}}
{parallelism}
sweep: {{metric: train/loss, mode: min, search: grid, space: {space}}}
""")
    r = run_cli("sweep", cfg, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"openclaw: error: `sweep.space` {expected}"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no MLflow store, no runs folder


def test_a_pipeline_split_that_misses_the_models_blocks_exits_2_before_anything_starts(text_dir, tmp_path):
    """`parallelism.pipeline_split` from the command line (a YAML list): the text example's gpt has 3 blocks."""
    r = run_cli("train", REPO / "jobs" / "configs" / "text-lm.yaml", "--set", f"data.train={text_dir / 'train'}",
                "--set", f"data.val={text_dir / 'val'}", "--set", "parallelism.pipeline=2",
                "--set", "parallelism.pipeline_split=[2, 2]", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("openclaw: error: `parallelism.pipeline_split` [2, 2] gives 4 block(s) to 2 stage(s), "
                               "but the model has 3 block(s)"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no MLflow store, no runs folder


def test_token_ids_past_the_models_vocabulary_or_context_exit_2_before_anything_starts(text_dir, tmp_path):
    """The text data's byte ids reach past a 100-token gpt: every worker's first step failed on them, one
    retry after another, with an IndexError. The footers' statistics and a forward on the meta device say
    so first."""
    r = run_cli("train", REPO / "jobs" / "configs" / "text-lm.yaml", "--set", f"data.train={text_dir / 'train'}",
                "--set", f"data.val={text_dir / 'val'}", "--set", "model.kwargs.vocab_size=100", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("openclaw: error: `data.train`: column 'x' (`data.features`) holds token ids from "), \
        r.stderr
    assert "but the model's output width is 100: token ids must lie in 0..99. Set `model.kwargs.vocab_size` to " \
           "at least" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no MLflow store, no runs folder
    # a context shorter than the sequences: the position embedding's lookup failed in every worker alike
    r = run_cli("train", REPO / "jobs" / "configs" / "text-lm.yaml", "--set", f"data.train={text_dir / 'train'}",
                "--set", f"data.val={text_dir / 'val'}", "--set", "model.kwargs.block_size=32", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("openclaw: error: `model.kwargs.block_size` (32) is shorter than the data's sequences "
                               "(64 tokens): set it to at least 64."), r.stderr


def test_debug_adds_traceback(tmp_path):
    r = run_cli("train", tmp_path / "missing.yaml", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "does not exist" in r.stderr


def test_help_lists_the_flags():
    r = run_cli("train", "--help")
    assert r.returncode == 0 and all(f in r.stdout for f in ("--set", "--address", "--verbose", "--debug"))
    # how to resume and stop, and what each exit code means
    said = " ".join(r.stdout.split())
    assert "The same command (the same `name` and `checkpoint.storage`) resumes the run" in said
    assert "2 a config, data or usage error (nothing started); 130 (Ctrl-C) or 143 (SIGTERM) stopped" in said
    sweep = " ".join(run_cli("sweep", "--help").stdout.split())
    assert "Ctrl-C or SIGTERM saves the sweep's state, marks its MLflow runs KILLED and stops it" in sweep
    assert "130 (Ctrl-C) or 143 (SIGTERM) stopped, resumable with --resume" in sweep


def test_config_defaults_prints_every_key_described_and_loads_back(tmp_path):
    import yaml

    from openclaw.config import Config
    r = run_cli("config", "--defaults")
    assert r.returncode == 0, r.stderr
    raw = yaml.safe_load(r.stdout)
    assert raw["data"]["train"] is None and "# (required)" in r.stdout  # the one key without a default
    raw["data"]["train"] = "datasets/x"
    assert Config.model_validate(raw) == Config.model_validate({"data": {"train": "datasets/x"}})
    keys = [line for line in r.stdout.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    described = [i for i, line in enumerate(r.stdout.splitlines()) if line.strip() and not line.lstrip().startswith("#")
                 and r.stdout.splitlines()[i - 1].lstrip().startswith("#")]
    assert len(described) == len(keys) > 60  # every key has its description right above it


def test_config_schema_is_json_schema_with_descriptions():
    import json
    r = run_cli("config", "--schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema["properties"]["train"]["description"].startswith("Batch sizes")
    assert "max_steps" in schema["$defs"]["TrainConfig"]["properties"]
    assert schema["$defs"]["CheckpointConfig"]["properties"]["async"]["description"].startswith("`async: true`")


def test_config_needs_schema_or_defaults():
    r = run_cli("config")
    assert r.returncode == 2 and "--schema" in r.stderr


@pytest.mark.integration
def test_a_bad_shard_found_while_preparing_the_data_exits_2_naming_it(digits_dir, tmp_path):
    """A data error found after Ray starts (the preparation's Ray Data tasks read every shard; preflight
    reads only footers) is a user error all the same: exit 2, one paragraph naming the shard, no traceback."""
    from conftest import BIN, with_bad_shard
    bad = with_bad_shard(digits_dir, tmp_path / "bad")
    r = subprocess.run([str(BIN / "openclaw"), "train", str(DIGITS), "--set", f"data.train={bad}",
                        "--set", f"data.val={digits_dir / 'val'}", "--set", "data.on_bad_shard=fail",
                        "--set", "data.transforms=[{op: cast, column: y, dtype: int64}]",
                        "--set", f"checkpoint.storage={tmp_path / 'runs'}",
                        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # its own local Ray
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]  # (after Ray Data's own log lines)
    assert last.startswith(f"openclaw: error: `data.train`: shard {bad / 'part-00009.parquet'} could not be read"), \
        r.stderr[-3000:]
    assert "`data.on_bad_shard: skip`" in last and "Traceback" not in r.stdout + r.stderr
    assert "starting" not in r.stdout  # it stopped before the run began


def test_a_finished_job_says_when_its_final_checkpoint_is_gone(digits_dir, tmp_path, capsys):
    """The same command on a finished job answers from its record; a final checkpoint deleted since is named."""
    from conftest import digits_config
    from openclaw.launch.preflight import storage_path
    from openclaw.launch.session import _already_finished
    from openclaw.tracking.job_file import record_finished
    cfg = digits_config(digits_dir, tmp_path, "sqlite:///unused.db",
                        **{"train.max_steps": 20, "tracking.enabled": False, "name": "gone"})
    final = tmp_path / "runs" / "gone" / "checkpoint_2026-12-05_06-00-00.000000"
    final.mkdir(parents=True)
    record_finished(cfg, storage_path(cfg), 20, str(final), {"train/loss": 0.5})
    assert _already_finished(cfg, storage_path(cfg), "sqlite:///unused.db").checkpoint == str(final)
    assert "already finished at step 20" in (out := capsys.readouterr().out) and "no longer there" not in out
    final.rmdir()
    assert _already_finished(cfg, storage_path(cfg), "sqlite:///unused.db").checkpoint == str(final)
    assert f"its final checkpoint, {final}, is no longer there; no copy of the final model is kept elsewhere " \
           "(`tracking.enabled` was off)" in capsys.readouterr().out


def _checkpoints(run: Path) -> dict[str, Path]:
    """A run's folder with five whole checkpoints, oldest first: valid (step 10), never finished (its
    manifest missing), valid (30), corrupt (a byte of model.pt changed), truncated (model.pt cut short)."""
    from openclaw.engine import checkpoint as ckpt_io
    made = {}
    for i, kind in enumerate(["ok", "unfinished", "ok", "corrupt", "truncated"], start=1):
        d = ckpt_io.save(run / f"checkpoint_2026-12-06_10-00-0{i}.000000", model={"w": torch.arange(64.0)},
                         trainer={}, state={"step": 10 * i}, config={})
        model = d / "model.pt"
        if kind == "unfinished":
            (d / ckpt_io.MANIFEST).unlink()
        elif kind == "corrupt":
            body = bytearray(model.read_bytes())
            body[-20] ^= 0xFF
            model.write_bytes(bytes(body))
        elif kind == "truncated":
            model.write_bytes(model.read_bytes()[:100])
        made[kind if kind != "ok" else f"ok{i}"] = d
    return made


def test_checkpoint_list_checks_each_checkpoint_as_a_resume_would_and_marks_where_it_starts(tmp_path, s3_server,
                                                                                            monkeypatch):
    from openclaw.engine import checkpoint as ckpt_io
    made = _checkpoints(tmp_path / "runs" / "job")
    r = run_cli("checkpoint", "list", tmp_path / "runs" / "job")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    state = {line.split()[0]: line for line in lines[1:-1]}
    # newest first as a resume walks them: by step, a folder not written in full (no step known) last
    assert list(state) == [made[k].name for k in ("truncated", "corrupt", "ok3", "ok1", "unfinished")]
    assert state[made["truncated"].name].endswith("skipped on resume: model.pt is 100 bytes, the manifest says "
                                                  f"{(made['ok1'] / 'model.pt').stat().st_size} (truncated or overwritten).")
    assert state[made["corrupt"].name].endswith("skipped on resume: model.pt fails its sha256 check (corrupt).")
    assert state[made["ok3"].name].split()[1:] == ["30", "whole", "4", "0.00", "ok", "<-", "a", "resume", "starts",
                                                   "here"]
    assert state[made["unfinished"].name].endswith("skipped on resume: no manifest.json: not written in full")
    assert state[made["ok1"].name].endswith(" ok")
    # what a resume accepts: the same checkpoints
    ok = set()
    for d in made.values():
        try:
            ckpt_io.verify(d)
            ok.add(d.name)
        except ckpt_io.CheckpointError:
            pass
    assert ok == {n for n, line in state.items() if " ok" in line}
    # --quick reads no file: the corrupt one's size matches, so it says so, and what it could not check
    quick = run_cli("checkpoint", "list", tmp_path / "runs" / "job", "--quick").stdout.splitlines()
    assert quick[2].endswith("sizes ok  <- a resume starts here, if its files' sha256 match")
    assert "no sha256 read" in quick[-1]
    # the same run in S3: every file streamed and checked, the same states
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    uri = s3_server.upload(tmp_path / "runs", "bkt/runs")
    remote = run_cli("checkpoint", "list", f"{uri}/job")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.splitlines()[1:-1] == lines[1:-1]
    # the storage folder, a checkpoint and nothing: exit 2, saying what to pass
    wrong = {p: run_cli("checkpoint", "list", p) for p in (tmp_path / "runs", made["ok1"], tmp_path / "nope")}
    assert all(w.returncode == 2 and "Traceback" not in w.stderr for w in wrong.values())
    assert "It holds the runs job: pass one of them." in wrong[tmp_path / "runs"].stderr
    assert "is one checkpoint, not a run's folder" in wrong[made["ok1"]].stderr
    assert "there is no run folder at" in wrong[tmp_path / "nope"].stderr
    # an object store that does not answer: exit 2 naming what to check (it was pyarrow's traceback)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    unreachable = run_cli("checkpoint", "list", "s3://bkt/runs/job", "--quick")
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.startswith("openclaw: error: cannot read s3://bkt/runs/job (") and \
        "the endpoint (`data.s3` / AWS_ENDPOINT_URL) and the credentials" in unreachable.stderr
    # a manifest without its file list: skipped, saying so, not a crash
    odd = tmp_path / "runs" / "job" / "checkpoint_2026-12-06_09-00-00.000000"
    odd.mkdir()
    (odd / "manifest.json").write_text('{"step": 5}')
    r = run_cli("checkpoint", "list", tmp_path / "runs" / "job")
    assert r.returncode == 0 and r.stdout.splitlines()[-2].endswith(
        "skipped on resume: manifest.json is malformed (no `files` mapping each name to its size, a whole number, and "
        "sha256)"), r.stdout + r.stderr


def test_a_librarys_own_error_prints_one_scrubbed_line_and_its_traceback_only_with_debug(tmp_path):
    """An MLflow error (here: sync-spool to a server that does not answer) escaped the CLI as a raw
    traceback whose message held the tracking URI's password."""
    from openclaw.tracking.spool import append_ops
    spool, uri = str(tmp_path / "spool.jsonl"), f"http://carol:topsecret@127.0.0.1:{_closed_port()}"
    append_ops(spool, uri, "0" * 32, [("metrics", ([{"key": "train/loss", "value": 1.0, "step": 1, "timestamp": 0}],))])
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    for debug in ([], ["--debug"]):
        r = subprocess.run([sys.executable, "-m", "openclaw.cli", "sync-spool", str(spool), "--tracking-uri", uri,
                            *debug], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode != 0 and "topsecret" not in r.stdout + r.stderr, r.stderr[-2000:]
        assert ("Traceback" in r.stderr) == bool(debug), r.stderr[-2000:]


def test_checkpoint_commands_take_file_uris_and_refuse_a_run_folder_uri_before_copying_it(tmp_path):
    """`checkpoint list file:///...` made an absolute path of the URI and found no run there; `consolidate`
    of a run folder's URI copied every checkpoint first, then named a temporary folder already gone; a URI
    with a space escaped as Arrow's 'Cannot parse URI'."""
    made = _checkpoints(tmp_path / "runs" / "job")
    listed = run_cli("checkpoint", "list", f"file://{tmp_path / 'runs' / 'job'}")
    assert listed.returncode == 0 and made["ok3"].name in listed.stdout, listed.stderr
    folder = run_cli("checkpoint", "consolidate", f"file://{tmp_path / 'runs' / 'job'}", "--out", tmp_path / "m.pt")
    assert folder.returncode == 2 and "is not one checkpoint (it has no manifest.json)" in folder.stderr, folder.stderr
    assert not (tmp_path / "m.pt").exists()
    spaced = run_cli("checkpoint", "consolidate", "s3://bkt/a run/checkpoint_x", "--out", tmp_path / "m.pt")
    assert spaced.returncode == 2 and "cannot read s3://bkt/a run/checkpoint_x" in spaced.stderr, spaced.stderr
    from openclaw.launch.checkpoint_list import is_one_checkpoint
    assert is_one_checkpoint(f"file://{made['ok3']}") and not is_one_checkpoint(str(tmp_path / "runs" / "job"))


def test_more_bad_input_exits_2_naming_what_to_fix(tmp_path):
    """Each of these left the CLI with exit 1: a config file that is not UTF-8, a bad OPENCLAW_*_S setting
    (a traceback), a spool file that is a folder, not JSON lines of ops, or empty (it also said it was
    renamed), and a folder without a manifest given to `checkpoint consolidate`."""
    def cli(*args, env=None):
        return subprocess.run([sys.executable, "-m", "openclaw.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **(env or {})})

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "list.jsonl").write_text("[]\n")
    (tmp_path / "nop.jsonl").write_text("{}\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "not-a-checkpoint").mkdir()
    runs = {
        "not utf-8": (cli("train", binary), f"{binary} is not UTF-8 text"),
        "bad setting": (cli("config", "--defaults", env={"OPENCLAW_STOP_GRACE_S": "abc"}),
                        "OPENCLAW_STOP_GRACE_S must be a number of seconds, not 'abc'"),
        "spool folder": (cli("sync-spool", tmp_path / "folder.jsonl"), "cannot read spool file"),
        "spool list": (cli("sync-spool", tmp_path / "list.jsonl"), "is not an openclaw spool file"),
        "spool no op": (cli("sync-spool", tmp_path / "nop.jsonl"), "is not an openclaw spool file"),
        "spool empty": (cli("sync-spool", tmp_path / "empty.jsonl"), "holds no tracking update"),
        "no manifest": (cli("checkpoint", "consolidate", tmp_path / "not-a-checkpoint", "--out", tmp_path / "m.pt"),
                        "is not one checkpoint (it has no manifest.json)"),
    }
    for name, (r, said) in runs.items():
        assert r.returncode == 2 and "Traceback" not in r.stderr and said in r.stderr, (name, r.returncode, r.stderr)
    assert (tmp_path / "empty.jsonl").exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_config_mistake_is_reported_before_torch_ray_or_mlflow_load(command):
    """`train` imported the preflight (torch, pyarrow, MLflow) and `sweep` Ray Tune before reading the
    config: a typo took 4.5 to 5.8 s to report."""
    probe = ("import sys; from openclaw.cli import main; "
             f"rc = main(['{command}', '{DIGITS}', '--set', 'train.max_stepz=1']); "
             "print(rc, [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[0] == "2 []" and "did you mean `train.max_steps`" in r.stderr, (r.stdout, r.stderr)


def test_checkpoint_list_of_a_live_run_names_a_checkpoint_deleted_while_it_was_read(tmp_path, monkeypatch):
    """Ray Train deletes a live run's older checkpoints (`checkpoint.keep`): one deleted between the
    listing of its files and the read of their sha256 ended the listing in a FileNotFoundError."""
    import pyarrow.fs as pafs

    import openclaw.launch.checkpoint_list as checkpoint_list
    made = _checkpoints(tmp_path / "runs" / "job")
    real = checkpoint_list._sha256

    def deleted_first(fs, path):
        if made["ok1"].name in path:
            shutil.rmtree(made["ok1"], ignore_errors=True)  # as Ray's controller does, between the two reads
        return real(fs, path)
    monkeypatch.setattr(checkpoint_list, "_sha256", deleted_first)
    listed = {c.name: c for c in (checkpoint_list._check(pafs.LocalFileSystem(), str(made[k]), made[k].name, False)
                                  for k in ("ok1", "ok3"))}
    assert listed[made["ok1"].name].problem == "deleted while it was being checked"
    assert listed[made["ok3"].name].problem is None


def test_a_stopped_runs_message_masks_the_storages_credentials(monkeypatch, capsys):
    """Every error the CLI prints was scrubbed but a stop's (Ctrl-C, SIGTERM), which names the run's
    folder: a storage URI's user info was printed whole."""
    from openclaw import cli
    from openclaw.errors import RunStopped

    def stopped(args):
        raise RunStopped("stopped by Ctrl-C; resume it with the same command (s3://AKIA1:wJalrSecret@bucket/sweep)",
                         "SIGINT")
    monkeypatch.setattr(cli, "cmd_config", stopped)
    assert cli.main(["config", "--defaults"]) == 130
    err = capsys.readouterr().err
    assert "wJalrSecret" not in err and "s3://***@bucket/sweep" in err
