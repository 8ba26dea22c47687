"""Shared fixtures: datasets made by the real recipes, one real local Ray instance per session, and an
MLflow sqlite store per test. Nothing here is mocked."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(sys.executable).parent


def prepare(name: str, out: Path, *args: str) -> Path:
    if not (out / "stats.json").exists():
        subprocess.run([PY, str(REPO / "data" / "prepare.py"), name, "--out", str(out), *args], check=True,
                       capture_output=True)
    return out


NEEDS_A_CLUSTER = {"ray_local"}
"""Fixtures that start Ray: a test using one is `integration` (`make test-unit` leaves it out)."""


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if NEEDS_A_CLUSTER & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(f"these tests start Ray ({', '.join(sorted(NEEDS_A_CLUSTER))}) but are not marked "
                                f"`integration`: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    return prepare("digits", tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    return prepare("text", tmp_path_factory.mktemp("text"), "--max-bytes", "3000000", "--seq-len", "64")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session, with more logical CPUs than cores."""
    import ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


_EMPTY_STORE: list[Path] = []


@pytest.fixture(scope="session")
def one_rank():
    """The test gpt's engine-level run on one rank, what every layout's is compared with
    (tests/parallel_harness.py): `ONE_RANK_STEPS` steps' (loss, gradient norm) and the final weights."""
    from parallel_harness import ONE_RANK_STEPS, spawn, train
    return spawn(1, train, {"strategy": "ddp"}, ONE_RANK_STEPS)[0]


@pytest.fixture(scope="session", autouse=True)
def _remove_the_empty_store():
    yield
    for db in _EMPTY_STORE:
        shutil.rmtree(db.parent, ignore_errors=True)


def sqlite_store(path: Path) -> str:
    """The URI of a new, empty MLflow sqlite store at `path`: a copy of one this session created once
    (and removes at its end). Creating one runs MLflow's schema migrations, 2-3 s on 2 cores; the CLI
    and job tests still create theirs as a user's first run does."""
    if not _EMPTY_STORE:
        empty = Path(tempfile.mkdtemp(prefix="openclaw-empty-store-")) / "mlflow.db"
        from mlflow.tracking import MlflowClient
        MlflowClient(f"sqlite:///{empty}").search_experiments()
        _EMPTY_STORE.append(empty)
    shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return sqlite_store(tmp_path / "mlflow.db")


def digits_config(digits_dir: Path, tmp_path: Path, mlflow_uri: str, **overrides):
    """The shipped digits example, pointed at test folders, with dotted-key overrides."""
    from openclaw import load_config
    base = {"data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "val"),
            "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri}
    return load_config(REPO / "jobs" / "configs" / "digits.yaml", {**base, **overrides})


def with_bad_shard(digits_dir: Path, folder: Path) -> Path:
    """A copy of the digits train shards in `folder` plus `part-00009.parquet`, whose footer (schema, row
    counts) still reads but whose page headers are destroyed: found bad only when its rows are read."""
    import shutil

    import pyarrow.parquet as pq
    shutil.copytree(digits_dir / "train", folder)
    pq.write_table(pq.read_table(folder / "part-00000.parquet"), folder / "part-00009.parquet")
    body = bytearray((folder / "part-00009.parquet").read_bytes())
    body[8:60] = b"\xab" * 52
    (folder / "part-00009.parquet").write_bytes(bytes(body))
    return folder


def ledger_records(path) -> list[dict]:
    """A `train.record_samples` log's records. The worker appends as it trains (and a SIGKILL can cut
    its last write short), so only lines that end in a newline are whole."""
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def newest_logged_step(run_dir, pid) -> int:
    """The newest step worker `pid` has logged in `run_dir`'s sample ledger, or -1."""
    steps = [rec["step"] for f in (run_dir / "samples").glob(f"rank*-{pid}.jsonl") for rec in ledger_records(f)[-1:]]
    return max(steps, default=-1)


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process has it now."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def live_workers(run_dir) -> set[int]:
    """The pids of a run's live training workers, from the sample ledgers they write (`rank<r>-<pid>.jsonl`):
    this run's alone, whatever else runs on the machine."""
    import psutil
    pids = {int(f.stem.rsplit("-", 1)[1]) for f in (run_dir / "samples").glob("rank*-*.jsonl")}
    return {pid for pid in pids if psutil.pid_exists(pid)}


def committed_batches(run_dir) -> dict[int, dict]:
    """From `train.record_samples` logs: each step's global batch as the final model saw it (from the
    newest attempt that ran that step, across restarts and resizes), with its epoch and world size."""
    lines = [rec for f in (run_dir / "samples").glob("*.jsonl") for rec in ledger_records(f)]
    newest_attempt: dict[int, tuple[float, str]] = {}
    for rec in lines:
        newest_attempt[rec["step"]] = max(newest_attempt.get(rec["step"], (0.0, "")), (rec["t"], rec["attempt"]))
    by_rank: dict[tuple[int, int], dict] = {}
    for rec in sorted(lines, key=lambda r: r["t"]):  # a rollback replays within an attempt: keep the last
        if rec["attempt"] == newest_attempt[rec["step"]][1]:
            by_rank[(rec["step"], rec["rank"])] = rec
    steps: dict[int, dict] = {}
    for (step, rank), rec in sorted(by_rank.items()):
        entry = steps.setdefault(step, {"epoch": rec["epoch"], "world": rec["world"], "positions": []})
        assert (entry["epoch"], entry["world"]) == (rec["epoch"], rec["world"]) and rec["applied"]
        entry["positions"] += rec["positions"]
    assert all(len({r for (s, r) in by_rank if s == step}) == b["world"] for step, b in steps.items())
    return steps


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and served artifacts; stop/start keep the data.
    Without MLflow's job runner, as `make mlflow-server` runs it (eight more processes that training never uses)."""

    def __init__(self, root: Path, *extra: str, env: dict | None = None, log: Path | None = None):
        """`log`: a file for the server's output, its access log included (default: discarded)."""
        self.root, self.extra, self.env, self.log = root, list(extra), env, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), *self.extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(self.env or {})})
        if self.log:
            out.close()  # the server holds its own copy
        import urllib.error
        import urllib.request
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers (an auth server may refuse an anonymous health check)
            except Exception:
                time.sleep(0.2)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its gunicorn/uvicorn workers
        self.proc.wait()


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 (in memory: a restart starts empty)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> "S3Server":
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return self
            except Exception:
                time.sleep(0.1)
        raise TimeoutError("moto_server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def filesystem(self):
        import pyarrow.fs as pafs
        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                 access_key="testing", secret_key="testing", allow_bucket_creation=True)

    def upload(self, local: Path, bucket_path: str) -> str:
        """Copy a local folder to `bucket/prefix`; returns its s3:// URI."""
        import pyarrow.fs as pafs
        fs = self.filesystem()
        fs.create_dir(bucket_path.split("/", 1)[0])
        pafs.copy_files(str(local), bucket_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return f"s3://{bucket_path}"


@pytest.fixture
def s3_server(monkeypatch):
    """A fresh S3 server; the driver's environment holds its credentials (as a user's would)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server().start()
    yield server
    if server.proc.poll() is None:
        server.stop()


class RefusingProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server that answers one chosen request itself with
    400, as MLflow does for an op it refuses (the first request whose path ends with `path` and whose body
    contains `needle`), and passes everything else through unchanged."""

    def __init__(self, target: str, path: str, needle: bytes):
        import http.server
        import urllib.error
        import urllib.request
        proxy = self
        self.refused: list[bytes] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.split("?")[0].endswith(path) and needle in body and not proxy.refused:
                    proxy.refused.append(body)
                    payload = b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "refused by the test"}'
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(target + self.path, data=body or None, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        status, data, kind = r.status, r.read(), r.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as e:
                    status, data, kind = e.code, e.read(), e.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
