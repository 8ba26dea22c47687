"""What every `jobs/*.py` entrypoint does: find openclaw, then run one `openclaw` command.

The job runs the openclaw it was submitted with: this working dir's `platform/`, shipped to every Ray
worker with the job, ahead of any openclaw installed on the cluster (which ran instead, and silently,
when the cluster's image had one: edits to the submitted copy were ignored). Without
`platform/openclaw/cli.py` (the entrypoints copied elsewhere), the installed openclaw runs.
"""
import importlib.util
import os
import sys


def run(command: str) -> int:
    here = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "platform"))
    if os.path.isfile(os.path.join(here, "openclaw", "cli.py")):
        installed = importlib.util.find_spec("openclaw")  # (finding imports nothing)
        sys.path.insert(0, here)
        os.environ["OPENCLAW_SHIP_PACKAGE"] = "1"
        if installed is not None and installed.origin and os.path.dirname(installed.origin) != os.path.join(
                here, "openclaw"):
            print(f"openclaw: running the submitted {os.path.join(here, 'openclaw')}, not the installed "
                  f"{os.path.dirname(installed.origin)}", file=sys.stderr)
    from openclaw.cli import main
    return main([command, *sys.argv[1:]])
