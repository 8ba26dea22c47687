"""What every `jobs/*.py` entrypoint does: find openclaw, then run one `openclaw` command.

Works whether or not openclaw is installed on the cluster: if it is not, the package is taken from
this working dir's `platform/` and shipped to every Ray worker with the job.
"""
import importlib.util
import os
import sys


def run(command: str) -> int:
    if importlib.util.find_spec("openclaw") is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "platform"))
        os.environ["OPENCLAW_SHIP_PACKAGE"] = "1"
    from openclaw.cli import main
    return main([command, *sys.argv[1:]])
