"""A tensor-parallel group across two nodes of a real `ray.cluster_utils.Cluster` (run by
test_placement.py in its own process, since the test session's local Ray instance owns that one).

The text gpt, tensor-parallel over 2 workers, one on each worker node, trains 4 steps. Prints the
run's console lines as they come, then one JSON line: the run's events.

    python tests/tp_across_nodes.py OUT TEXT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from node_loss import _events, start_cluster, stop_cluster  # noqa: E402


def main(out: Path, text: Path) -> int:
    import openclaw
    uri = f"sqlite:///{out / 'mlflow.db'}"
    config = openclaw.load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {
        "name": "tp-across-nodes", "parallelism.tensor": 2, "train.max_steps": 4, "train.log_every": 2,
        "train.eval_every": 0, "checkpoint.every_steps": 4, "model.kwargs.block_size": 64, "model.kwargs.depth": 2,
        "scaling.resources_per_worker": {"CPU": 1, "trainer": 1}, "data.train": str(text / "train"),
        "data.val": str(text / "val"), "checkpoint.storage": str(out / "runs"), "tracking.uri": uri})
    cluster, _, started_before = start_cluster(head_cpus=2)
    try:
        openclaw.train(config)
    finally:
        stop_cluster(cluster, started_before)
    print(json.dumps({"events": _events(uri, out / "runs" / config.name)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
