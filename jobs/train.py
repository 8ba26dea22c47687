"""Entrypoint for `ray job submit`: train from a YAML config.

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/digits.yaml [--set k=v ...]

Runs the submitted platform/, whether or not openclaw is installed on the cluster (see jobs/_entry.py).
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
