"""Tracking overhead: wall time per training step with MLflow tracking on vs `tracking.enabled: false`.

Both sides train the same MLP on the digits data with 2 Ray Train workers of one fresh local Ray
instance, logging every `--log-every` steps (train/, perf/ and system/ metrics, each window published
with its checkpoint to MLflow's sqlite store by the tracking service, which shares this machine's
CPUs). The figure per run is the run's own `perf/wall_step_s`: the training loop's wall time over its
steps, logging and checkpoints included, start-up and the final model upload left out. Runs alternate
off/on `--pairs` times; the ratio is of the medians.

    python bench/tracking_overhead.py        # prints both medians and the ratio, then one JSON line
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import REPO, prepare_digits  # noqa: E402  (bench/ is this script's folder)


def run(work: Path, name: str, tracked: bool, a: argparse.Namespace) -> float:
    import openclaw
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": None,
        "checkpoint.storage": str(work / "runs"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "tracking.enabled": tracked, "train.max_steps": a.steps, "train.log_every": a.log_every,
        "train.eval_every": 0, "checkpoint.every_steps": a.checkpoint_every, "train.global_batch_size": 256,
        "train.micro_batch_size": 128, "model.kwargs.hidden": a.hidden, "model.kwargs.depth": 3,
        "scaling.min_workers": 2, "scaling.max_workers": 2})
    return openclaw.train(cfg).metrics["perf/wall_step_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--hidden", type=int, default=1024)
    a = p.parse_args(argv)
    import ray
    off, on = [], []
    with tempfile.TemporaryDirectory(prefix="openclaw-tracking-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            for i in range(a.pairs):
                off.append(run(work, f"off-{i}", False, a))
                on.append(run(work, f"on-{i}", True, a))
        finally:
            ray.shutdown()
    ratio = statistics.median(on) / statistics.median(off)
    print(f"step time, tracking off: median {statistics.median(off) * 1e3:.2f} ms  {[round(x * 1e3, 2) for x in off]}")
    print(f"step time, tracking on:  median {statistics.median(on) * 1e3:.2f} ms  {[round(x * 1e3, 2) for x in on]}")
    print(f"ratio on/off: {ratio:.4f}  (target: at most 1.01; metrics every {a.log_every} steps)")
    print(json.dumps({"off_step_s": off, "on_step_s": on, "ratio": ratio, "log_every": a.log_every}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
