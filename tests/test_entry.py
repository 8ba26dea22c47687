"""`jobs/*.py`, the `ray job submit` entrypoints (jobs/_entry.py): they run the openclaw they were submitted
with, ahead of an installed one (run as a job's driver runs them, no Ray needed for `--help`)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a job's driver: openclaw as installed


def _help(entry: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(entry), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=entry.parent.parent, env=ENV)


def test_a_job_runs_the_submitted_openclaw_not_the_installed_one(tmp_path):
    """Installed on the cluster (this venv's editable install), openclaw ran instead of the submitted
    working dir's `platform/`, silently: a submitted fix never ran. The submitted copy runs, and says so.
    (From a second git worktree the install is the main checkout's: the check holds there too.)"""
    copy = tmp_path / "job"
    shutil.copytree(REPO / "jobs", copy / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "platform" / "openclaw", copy / "platform" / "openclaw",
                    ignore=shutil.ignore_patterns("__pycache__"))
    args = copy / "platform" / "openclaw" / "cli_args.py"
    args.write_text(args.read_text().replace("Train from a YAML config.", "Train from a YAML config (SUBMITTED)."))
    installed = subprocess.run([sys.executable, "-c", "import openclaw; print(openclaw.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path, env=ENV).stdout.strip()
    assert installed and str(copy) not in installed, installed  # what the submitted copy must win over
    got = _help(copy / "jobs" / "train.py")
    assert got.returncode == 0, got.stderr
    assert "(SUBMITTED)" in " ".join(got.stdout.split()), got.stdout
    assert f"running the submitted {copy / 'platform' / 'openclaw'}, not the installed" in got.stderr
    here = _help(REPO / "jobs" / "train.py")  # a note only where the install is another checkout's (a worktree)
    assert here.returncode == 0 and "(SUBMITTED)" not in here.stdout
    assert ("not the installed" in here.stderr) == (not installed.startswith(str(REPO / "platform"))), here.stderr
