"""Entrypoint for `ray job submit`: train from a YAML config.

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/digits.yaml [--set k=v ...]

Works whether or not openclaw is installed on the cluster: if it is not, the package is taken from
this working dir's `platform/` and shipped to every Ray worker with the job.
"""
import os
import sys

try:
    import openclaw  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "platform"))
    os.environ["OPENCLAW_SHIP_PACKAGE"] = "1"

from openclaw.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
