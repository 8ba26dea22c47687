"""Elastic node loss on a 2-node `ray.cluster_utils.Cluster` on this machine: openclaw beside bare Ray
Train V2 (`../shared/anchors/bare_ray_node_loss.py`), in one invocation, each clock stopped at the end of
the first training step at world size 1 after the node died.

- openclaw: the digits MLP (made wide enough to take a while) with `num_workers=(1, 2)`. One worker node
  is killed after the first checkpoint; once training goes on at world size 1 a replacement node joins
  (by default a `ray start --address` raylet, as an operator would add one; `--replacement cluster` uses
  `Cluster.add_node`), and the run grows back to 2. Both clocks read the run's `first_step` events.
- bare, same settings: the anchor with `--tuned`: openclaw's node health checks (1 s x 3), worker-start
  timeout (10 s), controller poll (0.25 s) and resize monitor (2 s).
- bare, Ray's defaults: the anchor as a user gets it.

Each side runs in its own process; the sides alternate (ABBA) over `--repeats` rounds.

    python bench/node_loss.py                 # 5 rounds: medians, spreads, ratios, then one JSON line
    python bench/node_loss.py --side openclaw --out /tmp/nodeloss   # one openclaw run, its files kept
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ATTEMPTS, add_budget, alternate, first_step_after, prepare_digits, run_events, run_side, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "anchors" / "bare_ray_node_loss.py"

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


def _wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


EVENTS_POLL_S = 1.0
"""How often the run's events are read while it recovers, as the anchor reads its log: each read is an MLflow
client listing and downloading the event parts, on the cores the recovery runs on. The figures come from
the events' own timestamps, so a slower poll loses nothing."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds of the sides, in ABBA order (default 5)")
    add_budget(p)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--out", type=Path, help="work folder (data, runs, mlflow.db); default: a temporary one")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides, openclaw side")
    p.add_argument("--replacement", choices=["ray-start", "cluster"], default="ray-start",
                   help="how the replacement node joins: a `ray start --address` raylet (as an operator would "
                        "add one) or `Cluster.add_node`")
    p.add_argument("--side", choices=["openclaw"], help="only one openclaw run in this process, printed as one JSON "
                                                          "line with its world sizes and final checkpoint (needs --out)")
    a = p.parse_args(argv)
    if a.side:
        if not a.out:
            p.error("--side openclaw needs --out")
        print(json.dumps(openclaw_side(a.out, a.overrides, a.replacement)))
        return 0
    work = a.out or Path(tempfile.mkdtemp(prefix="openclaw-node-loss-"))
    rounds = iter(range(10**6))
    argv_of = {
        "openclaw": lambda: [__file__, "--side", "openclaw", "--out", str(work), "--replacement", a.replacement,
                             "--set", f"name=elastic-{next(rounds)}", *sum((["--set", o] for o in a.overrides), [])],
        "bare, same settings": lambda: [str(ANCHOR), "--tuned"],
        "bare, Ray defaults": lambda: [str(ANCHOR)],
    }
    names = [s.strip() for s in a.sides.split(",")]
    unknown = [n for n in names if n not in SIDES]
    if unknown:
        p.error(f"--sides: unknown {unknown}; choose from {list(SIDES)}")
    runs = alternate({SIDES[n]: (lambda n=n: run_side(argv_of[SIDES[n]](), timeout_s=1200)) for n in names},
                     a.repeats, a.budget_s)
    failed = {k: [r for r in v if r.get("node_loss_recovery_s") is None] for k, v in runs.items()}
    for side, bad in failed.items():
        if bad:
            print(f"  {side}: {len(bad)} run(s) never trained again at world size 1: {bad}")
    values = {k: [r["node_loss_recovery_s"] for r in v if r.get("node_loss_recovery_s") is not None]
              for k, v in runs.items()}
    base = "bare, same settings" if "bare, same settings" in values else next(iter(values))
    out = summarize("seconds from a node's death to the end of the first step at world size 1 (openclaw: an MLP "
                    "of hidden 512 x 3, killed after its first valid checkpoint, head of 3 CPUs; bare: the anchor's "
                    "Linear(32, 1) with a 0.1 s sleep per step, killed at a fixed 30 s, head of 2 CPUs)",
                    values, base=base)
    if "openclaw" in runs:
        out["regrow"] = summarize("openclaw: seconds from the replacement node's join to the end of the first "
                                  "step at world size 2", {"openclaw": [r["regrow_s"] for r in runs["openclaw"]]},
                                  base="openclaw")
        out["openclaw_runs"] = runs["openclaw"]
    print(json.dumps(out))
    return 0


SIDES = {"openclaw": "openclaw", "bare-tuned": "bare, same settings", "bare-default": "bare, Ray defaults"}
"""`--sides` names and the columns they print."""


def openclaw_side(out: Path, extra: list[str], replacement: str) -> dict:
    """One openclaw run: kill a node after the first checkpoint, add a replacement once training goes on
    at world size 1, read the times from the run's events."""
    out.mkdir(parents=True, exist_ok=True)
    prepare_digits(out / "digits")

    import openclaw

    uri = f"sqlite:///{out / 'mlflow.db'}"
    overrides = {**OVERRIDES, "data.train": str(out / "digits" / "train"), "data.val": str(out / "digits" / "val"),
                 "checkpoint.storage": str(out / "runs"), "tracking.uri": uri}
    config = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", overrides)
    config = openclaw.load_config(None, extra, base=config.resolved())

    cluster, victim, started_before = start_cluster(head_cpus=3)
    run_dir = out / "runs" / config.name
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
        _wait_for(lambda: first_step_after(_events(uri, run_dir), marks["killed"], 1), 300,
                  "training at world size 1", EVENTS_POLL_S)
        if replacement == "ray-start":
            joined += ray_start_node(cluster.address)
        else:
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
        marks["added"] = time.time()
        _wait_for(lambda: first_step_after(_events(uri, run_dir), marks["added"], 2), 300,
                  "training at world size 2 again", EVENTS_POLL_S)
        trainer.join(timeout=600)
    finally:
        stop_cluster(cluster, started_before, joined)

    all_events = _events(uri, run_dir)
    shrink, grow = first_step_after(all_events, marks["killed"], 1), first_step_after(all_events, marks["added"], 2)
    evs = [e for e in all_events if e["event"] in ATTEMPTS]
    return {
        "node_loss_recovery_s": round(shrink["t"] - marks["killed"], 1),
        "regrow_s": round(grow["t"] - marks["added"], 1),
        "grow_resumed_from_step": grow["step"],
        "checkpoints_before_grow": [e["step"] for e in all_events if e["event"] == "checkpoint_requested"],
        "world_sizes": [e["world_size"] for e in evs], "causes": [e["event"] for e in evs],
        "finished_step": result["train"].metrics.get("step") if "train" in result else None,
        "checkpoint": result["train"].checkpoint if "train" in result else None,
    }


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
