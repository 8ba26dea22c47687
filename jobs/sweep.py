"""Entrypoint for `ray job submit`: a hyperparameter sweep from a YAML config with a `sweep:` section.

    ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/digits-sweep.yaml [--resume] [--set k=v ...]

Runs the submitted platform/, whether or not openclaw is installed on the cluster (see jobs/_entry.py).
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("sweep"))
