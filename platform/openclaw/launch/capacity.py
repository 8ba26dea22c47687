"""Whether the Ray cluster's nodes can hold a run's smallest worker group: pure logic, asked by the driver
(`launch.ray_setup.check_capacity`) once Ray is connected, before the data is prepared or any worker starts.

Ray Train places each worker's resources whole on one node. A group no node set can hold is not an error
to Ray: the controller's start times out, and it retries and waits for nodes. On the local instance
openclaw starts, no node will ever join, so that run would hang; openclaw refuses it (exit 2). On a
cluster, nodes may still join (an autoscaler, a `ray start --address`), so openclaw only says what is
missing and lets Ray Train wait.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

_EPS = 1e-9  # Ray keeps resources in fixed point (1e-4): 0.1 x 10 must read as 1


def workers_that_fit(per_worker: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many workers of `per_worker` resources `nodes` (each node's total resources) hold, each
    worker whole on one node. A worker that asks for nothing fits without limit."""
    need = {r: v for r, v in per_worker.items() if v > 0}
    if not need:
        return sys.maxsize
    return sum(min(int(node.get(r, 0.0) / v + _EPS) for r, v in need.items()) for node in nodes)


def shortfall(per_worker: Mapping[str, float], min_workers: int,
              nodes: Sequence[Mapping[str, float]], may_grow: bool = False) -> str | None:
    """None where `nodes` hold `min_workers` workers of `per_worker`; else a sentence that says what each
    worker asks for, how many the nodes hold, and which setting to change. `may_grow`: a cluster, where
    an autoscaler may add the nodes (GPU nodes that start at zero): GPUs are not talked out of there."""
    fit = workers_that_fit(per_worker, nodes)
    if fit >= min_workers:
        return None
    asks = {r: v for r, v in per_worker.items() if v > 0}
    absent = [r for r, v in asks.items() if not any(node.get(r, 0.0) + _EPS >= v for node in nodes)]
    has = ", ".join(f"{r}: {_amount(sum(n.get(r, 0.0) for n in nodes))}" for r in asks)
    said = (f"`scaling.min_workers` is {min_workers}, each worker asking for {_resources(asks)}, and the "
            f"{len(nodes)} node(s) of this Ray instance hold {fit} such worker(s) (they have {has} in all)")
    if "GPU" in absent and may_grow:
        return said + ("; no node has a GPU yet. An autoscaler that adds GPU nodes on demand starts one now; "
                       "on a cluster that has none, set `scaling.use_gpu` to `false`.")
    if "GPU" in absent:
        return said + ("; no node has a GPU. Set `scaling.use_gpu` to `auto` (GPUs only where the cluster "
                       "has them) or `false`, and leave GPU out of `scaling.resources_per_worker`.")
    if absent:
        return said + (f"; no node has {' or '.join(f'{r} {_amount(asks[r])}' for r in absent)}. Lower "
                       + " and ".join(f"`scaling.resources_per_worker.{r}`" for r in absent) + ".")
    return said + ". Lower `scaling.min_workers` or `scaling.resources_per_worker`, or add nodes."


def _resources(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {_amount(v)}" for r, v in resources.items()) + "}"


def _amount(value: float) -> str:
    return f"{value:g}"


def auto_gpu_note(setting: bool | str, found_gpu: bool, may_grow: bool) -> str | None:
    """What to say when `scaling.use_gpu: auto` finds no GPU on a cluster (`may_grow`): it means "GPUs if
    the cluster has one now", so a cluster whose GPU nodes start at zero would train on CPUs."""
    if setting != "auto" or found_gpu or not may_grow:
        return None
    return ("`scaling.use_gpu: auto` found no GPU on this cluster now, so the workers train on CPUs. Where an "
            "autoscaler adds GPU nodes on demand (they start at zero), set `scaling.use_gpu: true`.")
