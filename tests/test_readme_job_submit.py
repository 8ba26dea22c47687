"""The README's `ray job submit` sequence, run verbatim on a fresh machine: a new HOME (no ~/.ray), a
real `ray start --head` in a network namespace of its own (so Ray's default ports are free whatever else
runs here), and nothing but the README's lines. The head must start with token auth on, the job must
succeed, and its runs and MLflow store must land in ~/openclaw, where they outlive Ray's copy of the
working folder."""
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### `ray job submit`"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)]


def _kill_namespace(netns: str) -> None:
    for p in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{p.pid}/ns/net") == netns:
                p.send_signal(signal.SIGKILL)
        except (OSError, psutil.Error):
            pass


def test_the_readme_job_submit_sequence_works_verbatim_on_a_fresh_machine(tmp_path):
    block = readme_block()
    assert "ray get-auth-token --generate" in block and "ray job submit" in block
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    script = (f"set -euo pipefail\nip link set lo up\nreadlink /proc/self/ns/net > {tmp_path / 'netns'}\n"
              f"cd {REPO}\n{block}")
    # The README's `ray start` records its head in Ray's address file, shared with this machine; the head dies
    # with its namespace, so the file would name a dead cluster for whatever runs next here.
    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_bytes() if address_file.exists() else None
    try:
        r = subprocess.run(["unshare", "--net", "bash", "-c", script], env=env, capture_output=True, text=True,
                           timeout=900)
    finally:
        if (tmp_path / "netns").exists():
            _kill_namespace((tmp_path / "netns").read_text().strip())
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(before)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Token authentication is disabled" not in out and "Token authentication is enabled" in out
    assert oct((home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    assert "succeeded" in out and "openclaw: done. final metrics" in out
    store = home / "openclaw" / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in out
    assert list((home / "openclaw" / "runs" / "digits-mlp").glob("checkpoint_*/manifest.json"))
    with sqlite3.connect(store) as db:
        assert db.execute("select status from runs").fetchall() == [("FINISHED",)]
