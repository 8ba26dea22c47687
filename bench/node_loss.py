"""Elastic node loss and return on a 2-node `ray.cluster_utils.Cluster` on this machine.

Trains the digits MLP (made wide enough to take a while) with `num_workers=(1, 2)`, kills one worker
node after the first checkpoint, adds a replacement node once training has resumed on one worker
(by default a `ray start --address` raylet, as an operator would add one; `--replacement cluster` uses
`Cluster.add_node`), and reads the run's events back from MLflow. Prints one JSON line:

    node_loss_recovery_s   node death -> training resumed at world size 1
    regrow_s               replacement node added -> training resumed at world size 2
    world_sizes            the world size of every start, restart and resize, in order

    python bench/node_loss.py --out /tmp/nodeloss     # then compare with ../shared/anchors/bare_ray_node_loss.py
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ATTEMPTS, prepare_digits, run_events  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]

OVERRIDES = {
    "name": "elastic", "train.max_steps": 1500, "train.log_every": 50, "train.eval_every": 0,
    "checkpoint.every_steps": 100, "checkpoint.keep": 3, "failure.max_failures": 10,
    "model.kwargs.hidden": 512, "model.kwargs.depth": 3,
    "scaling.min_workers": 1, "scaling.max_workers": 2,
    "scaling.resources_per_worker": {"CPU": 1, "trainer": 1},
    "scaling.resize_monitor_interval_s": 2, "failure.worker_start_timeout_s": 10,
}

# Node health checks: a dead node is declared dead after about period x threshold.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (data, runs, mlflow.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    p.add_argument("--replacement", choices=["ray-start", "cluster"], default="ray-start",
                   help="how the replacement node joins: a `ray start --address` raylet (as an operator would "
                        "add one) or `Cluster.add_node`")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    prepare_digits(a.out / "digits")

    import openclaw

    uri = f"sqlite:///{a.out / 'mlflow.db'}"
    overrides = {**OVERRIDES, "data.train": str(a.out / "digits" / "train"), "data.val": str(a.out / "digits" / "val"),
                 "checkpoint.storage": str(a.out / "runs"), "tracking.uri": uri}
    config = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", overrides)
    config = openclaw.load_config(None, a.overrides, base=config.resolved())

    cluster, victim, started_before = start_cluster(head_cpus=3)
    run_dir = a.out / "runs" / config.name
    marks: dict[str, float] = {}
    result: dict = {}
    joined: list = []

    def fit():
        result["train"] = openclaw.train(config)

    trainer = threading.Thread(target=fit, daemon=True)
    trainer.start()
    try:
        _wait_for(lambda: has_valid_checkpoint(run_dir), 300, "the first checkpoint")
        cluster.remove_node(victim, allow_graceful=False)
        marks["killed"] = time.time()
        events = lambda: [e for e in _events(uri, run_dir) if e["event"] in ATTEMPTS]  # noqa: E731
        _wait_for(lambda: any(e.get("world_size") == 1 for e in events()), 300, "a restart at world size 1")
        if a.replacement == "ray-start":
            joined += ray_start_node(cluster.address)
        else:
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
        marks["added"] = time.time()
        _wait_for(lambda: any(e.get("world_size") == 2 and e["t"] > marks["added"] for e in events()), 300,
                  "growing back to world size 2")
        trainer.join(timeout=600)
    finally:
        stop_cluster(cluster, started_before, joined)

    all_events = _events(uri, run_dir)
    evs = [e for e in all_events if e["event"] in ATTEMPTS]
    shrink = next(e for e in evs if e["world_size"] == 1)
    grow = next(e for e in evs if e["world_size"] == 2 and e["t"] > marks["added"])
    requested = [e["step"] for e in all_events if e["event"] == "checkpoint_requested"]
    print(json.dumps({
        "grow_resumed_from_step": grow["resumed_from_step"], "checkpoints_before_grow": requested,
        "node_loss_recovery_s": round(shrink["t"] - marks["killed"], 1),
        "regrow_s": round(grow["t"] - marks["added"], 1),
        "world_sizes": [e["world_size"] for e in evs], "causes": [e["event"] for e in evs],
        "finished_step": result["train"].metrics.get("step") if "train" in result else None,
        "checkpoint": result["train"].checkpoint if "train" in result else None,
    }))
    return 0


def start_cluster(head_cpus: int):
    """A `Cluster` on this machine: the head and two worker nodes with one `trainer` slot each, joined
    by this process. Returns the cluster, the second worker node, and the pids to spare at teardown."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "_system_config": SYSTEM_CONFIG})
    cluster.add_node(num_cpus=1, resources={"trainer": 1})
    second = cluster.add_node(num_cpus=1, resources={"trainer": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, second, before


def stop_cluster(cluster, before: set[int], joined: list = ()) -> None:
    """Shut the cluster down and kill whatever of it is left (and of the raylets in `joined`)."""
    import psutil
    import ray
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    procs += list(joined) + [c for p in joined for c in _children(p)]
    ray.shutdown()
    cluster.shutdown()
    _kill(procs)


def has_valid_checkpoint(run_dir: Path) -> bool:
    """A checkpoint whose files all match its manifest: Ray copies a checkpoint's files into storage in
    no particular order, so the manifest can appear before the files it lists are complete."""
    from openclaw.engine import checkpoint
    for d in run_dir.glob("checkpoint_*"):
        try:
            checkpoint.verify(d)
            return True
        except Exception:
            pass
    return False


def ray_start_node(address: str) -> list:
    """Join a worker node to the cluster with `ray start --address` (fresh ports: it shares this machine).
    Returns the node's processes, which outlive `ray start` and the cluster's shutdown."""
    import os
    import socket

    import psutil

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    before = {p.pid for p in psutil.process_iter()}
    ports = [f"--{k}={free_port()}" for k in ("node-manager-port", "object-manager-port",
                                               "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                               "runtime-env-agent-port", "metrics-export-port")]
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", f"--address={address}",
                    f"--node-ip-address={address.split(':')[0]}", "--num-cpus=1", '--resources={"trainer": 1}',
                    *ports, "--disable-usage-stats"], check=True, capture_output=True, timeout=120,
                   env={**os.environ, **_cluster_auth()})
    return [p for p in psutil.process_iter() if p.pid not in before]


def _cluster_auth() -> dict[str, str]:
    """The joining raylet must use the cluster's auth mode (and token). `ray.cluster_utils.Cluster` runs
    without token auth; a raylet started with RAY_AUTH_MODE=token then refuses the GCS's unauthenticated
    lease requests ("InvalidAuthToken"), and every grow into the new node times out."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    if not is_token_auth_enabled():
        return {"RAY_AUTH_MODE": "disabled"}
    from ray._raylet import AuthenticationTokenLoader
    header = next(iter(AuthenticationTokenLoader.instance().get_token_for_http_header().values()), "")
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": header.removeprefix("Bearer ").strip()}


def _children(p) -> list:
    import psutil
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _kill(procs) -> None:
    """The nodes' agents (dashboard, runtime env) outlive `cluster.shutdown()` and keep their ports."""
    import psutil
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _events(uri: str, run_dir: Path) -> list[dict]:
    job = run_dir / "openclaw_job.json"
    if not job.exists():
        return []
    try:  # polled while the run starts: no artifact yet is not an error
        return run_events(uri, json.loads(job.read_text())["mlflow_run_id"])
    except Exception:
        return []


if __name__ == "__main__":
    sys.exit(main())
