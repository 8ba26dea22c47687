"""`make mlflow-server`'s recipe (deploy/mlflow-server.sh) starts a real basic-auth MLflow server: a
generated admin password kept 0600, anonymous requests refused, foreign Host headers refused, no
secret on any process's command line, and no MLflow job runner beside it."""
import base64
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.sys.executable).parent
pytestmark = pytest.mark.integration


def _get(url, auth=None, host=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:  # not listening yet
        return None


def test_the_recipe_serves_basic_auth_with_a_private_password_and_no_secret_in_argv(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db_secret = "postgres-password-in-the-uri"
    (tmp_path / "db-uri").write_text(f"sqlite:///{tmp_path / 'mlflow.db'}?note={db_secret}")
    env = {**os.environ, "OPENCLAW_HOME": str(tmp_path / "home"), "MLFLOW_PORT": str(port),
           "MLFLOW_BACKEND_STORE_URI_FILE": str(tmp_path / "db-uri"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    env.pop("PYTHON", None)  # run as a user runs it: `python3` from PATH (it ran `./mlflow` then)
    proc = subprocess.Popen([str(REPO / "deploy" / "mlflow-server.sh")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _get(url) not in (401, 200):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        secret = tmp_path / "home" / "mlflow-server" / "admin-password"
        password = secret.read_text().strip()
        assert oct(secret.stat().st_mode & 0o777) == "0o600" and len(password) >= 32
        assert oct((secret.parent).stat().st_mode & 0o777) == "0o700"
        # its folder defaults into ~/openclaw, the project that `ray job submit --working-dir .` uploads
        assert (secret.parent / ".gitignore").read_text().split() == ["*"]
        assert _get(url) == 401  # anonymous: refused
        assert _get(url, ("admin", "not-the-password")) == 401
        assert _get(url, ("admin", password)) == 200
        assert _get(url, ("admin", password), host="evil.example.com") == 403  # DNS rebinding: refused
        cmdlines = [" ".join(p.cmdline()) for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]]
        assert any("--app-name basic-auth" in c and "--allowed-hosts" in c for c in cmdlines)
        assert not any(password in c or db_secret in c for c in cmdlines)
        # The server and its uvicorn worker, and no huey job runner (MLflow 3 starts eight more processes).
        assert not any("huey" in c or "_job_runner" in c for c in cmdlines) and len(cmdlines) <= 3, cmdlines
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
