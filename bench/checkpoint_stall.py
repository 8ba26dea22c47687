"""Checkpoint stall: seconds training waits per checkpoint, synchronous vs `checkpoint.async`, in one run.

Both sides train the same ~100 MB MLP (25 M float32 parameters; with AdamW's two moments a checkpoint
is about 300 MB) on the digits data, on one Ray Train worker of a fresh local Ray instance, saving
every `--every` steps. The stall of each checkpoint is what the run logs as `perf/checkpoint_stall_s`:
for a synchronous save, serializing, checksumming, copying into storage and reporting; for an async
one, the host snapshot plus the later report. The final checkpoint is synchronous on both sides and is
left out.

    python bench/checkpoint_stall.py       # prints both medians and the ratio, then one JSON line
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import prepare_digits  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]


def run(work: Path, background: bool, steps: int, every: int, hidden: int) -> dict:
    import openclaw
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = "async" if background else "sync"
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": None,
        "checkpoint.storage": str(work / "runs"), "tracking.uri": uri, "train.max_steps": steps,
        "checkpoint.every_steps": every, "checkpoint.keep": 2, "checkpoint.async": background,
        "train.log_every": every, "train.eval_every": 0, "scaling.min_workers": 1, "scaling.max_workers": 1,
        "scaling.resources_per_worker": {"CPU": 2}, "model.kwargs.hidden": hidden, "model.kwargs.depth": 2})
    result = openclaw.train(cfg)
    history = MlflowClient(uri).get_metric_history(result.run_id, "perf/checkpoint_stall_s")
    stalls = [m.value for m in sorted(history, key=lambda m: m.step) if m.step < steps]
    params = sum(p.numel() for p in openclaw.load_model(result.checkpoint).parameters())
    return {"stalls_s": stalls, "median_s": statistics.median(stalls), "model_mb": params * 4 / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=130)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--hidden", type=int, default=5000, help="MLP width: 5000 gives 25 M parameters (101 MB)")
    a = p.parse_args(argv)
    import ray
    with tempfile.TemporaryDirectory(prefix="openclaw-stall-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            sync = run(work, False, a.steps, a.every, a.hidden)
            background = run(work, True, a.steps, a.every, a.hidden)
        finally:
            ray.shutdown()
    ratio = background["median_s"] / sync["median_s"]
    print(f"model: {sync['model_mb']:.0f} MB of float32 parameters (checkpoint with AdamW state about 3x)")
    print(f"sync saves:  median stall {sync['median_s']:.3f} s per checkpoint  {[round(s, 3) for s in sync['stalls_s']]}")
    print(f"async saves: median stall {background['median_s']:.3f} s per checkpoint  "
          f"{[round(s, 3) for s in background['stalls_s']]}")
    print(f"ratio async / sync: {ratio:.3f}")
    print(json.dumps({"model_mb": round(sync["model_mb"], 1), "sync_stall_s": round(sync["median_s"], 4),
                      "async_stall_s": round(background["median_s"], 4), "ratio": round(ratio, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
