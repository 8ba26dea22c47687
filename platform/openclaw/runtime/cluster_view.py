"""Ray's view of the cluster's nodes: the GCS node table and Ray Data's autoscaling coordinator (used by
the driver's node watcher and by the controller callbacks that settle lost nodes).

Ray Train V2's elastic policy sizes a (re)started worker group from the node resources held by Ray
Data's AutoscalingCoordinator, which re-reads the cluster only every 20 s. For up to 20 s after a node
dies, the policy still counts the dead node's resources, asks for a worker group that cannot be
placed, and waits out a whole worker-start timeout before it retries smaller (Ray's default is 60 s:
74 s from node death to the first step, measured). Polling the GCS node table is cheap; on a change
openclaw asks the coordinator to recompute at once, so the restart sees the truth.
"""
from __future__ import annotations

import socket
import time

import ray

from openclaw.runtime.ray_private import get_or_create_autoscaling_coordinator


def alive_nodes() -> frozenset[str]:
    return frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])


def coordinator():
    """Ray Data's AutoscalingCoordinator (a named, detached actor), created on this node if missing."""
    return get_or_create_autoscaling_coordinator()


def refresh_coordinator() -> None:
    ray.get(coordinator().get_reserved_resources.remote("openclaw-node-watch", recompute=True), timeout=10)


def raylet_answers(node: dict, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=timeout_s):
            return True
    except OSError:
        return False


def settle_lost_nodes(wait_s: float) -> list[str]:
    """If a node the GCS still lists as alive no longer answers, wait (at most `wait_s`) until the GCS
    declares it dead, then refresh the coordinator. Returns the ids of the nodes found unreachable."""
    lost = [n["NodeID"] for n in ray.nodes() if n["Alive"] and not raylet_answers(n)]
    deadline = time.monotonic() + wait_s
    while lost and time.monotonic() < deadline and not alive_nodes().isdisjoint(lost):
        time.sleep(0.2)  # polling the GCS, which decides node death on its own health-check clock
    if lost:
        refresh_coordinator()
    return lost
