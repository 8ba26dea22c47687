"""Ray's preemption notice on a real 2-node `ray.cluster_utils.Cluster` (run by test_preemption.py in its
own process, since the test session's local Ray instance owns that one).

One training worker on each worker node. After the first checkpoint a worker is SIGKILLed, so that the
notice must reach a restarted worker group. Once it trains again, the second node is drained the way a
spot reclaim or an autoscaler scale-down drains it (`DrainNode`, reason preemption, with a deadline).
Prints one JSON line: the run's events, when the drain was requested, the actors started.

    python tests/drain_cluster.py OUT DIGITS_DIR
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from node_loss import OVERRIDES, _events, _wait_for, has_valid_checkpoint, start_cluster, stop_cluster  # noqa: E402


def main(out: Path, digits: Path) -> int:
    import psutil
    import ray
    from ray.core.generated import autoscaler_pb2

    import openclaw
    uri = f"sqlite:///{out / 'mlflow.db'}"
    config = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        **OVERRIDES, "name": "drained", "scaling.min_workers": 2, "scaling.max_workers": 2,
        "train.max_steps": 2500, "data.train": str(digits / "train"), "data.val": str(digits / "val"),
        "checkpoint.storage": str(out / "runs"), "tracking.uri": uri})
    cluster, drained, started_before = start_cluster(head_cpus=2)
    t0 = time.time()
    run_dir = out / "runs" / config.name
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(train=openclaw.train(config)), daemon=True)
    trainer.start()
    try:
        _wait_for(lambda: has_valid_checkpoint(run_dir), 300, "the first checkpoint")
        victim = next(p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or []))
        os.kill(victim.pid, signal.SIGKILL)
        _wait_for(lambda: any(e["event"] == "restart" for e in _events(uri, run_dir)), 300, "the restart")
        gcs = ray._private.worker.global_worker.gcs_client
        accepted, why = gcs.drain_node(drained.node_id,
                                       autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                       "test: spot reclaim", int((time.time() + 120) * 1000))
        assert accepted, why
        drained_at = time.time()
        trainer.join(timeout=600)
        actors = Counter(a["ActorClassName"].rsplit(".", 1)[-1] for a in
                         ray._private.state.state.actor_table(None).values() if a["StartTime"] >= t0 * 1000)
    finally:
        stop_cluster(cluster, started_before)
    print(json.dumps({"events": _events(uri, run_dir), "drained_at": drained_at, "actors": actors,
                      "finished_step": result["train"].metrics.get("step") if "train" in result else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
