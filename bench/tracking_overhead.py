"""Tracking overhead: wall time per training step with MLflow tracking on vs `tracking.enabled: false`.

Both sides train the same MLP on the digits data with 2 Ray Train workers of one fresh local Ray
instance, logging every `--log-every` steps (train/, perf/ and system/ metrics, each window published
with its checkpoint to MLflow's sqlite store by the tracking service, which shares this machine's
CPUs). Two figures per run:

- the run's own `perf/wall_step_s`: the training loop's wall time over its steps, logging and
  checkpoints included;
- end to end: the wall time of the whole `openclaw.train` call, which adds what tracking costs outside
  the loop: creating the MLflow run, logging params and the dataset inputs, the final model's upload,
  and the last flush.

Each side runs once first, not counted (Ray's worker pool, the MLflow database's creation). The sides
then alternate (ABBA: off, on, on, off, ...) over `--repeats` rounds; medians, spreads (min-max) and
ratios of medians. Metrics reach MLflow with each checkpoint (`--checkpoint-every`): a run shorter than
that interval sends them only at its end.

    python bench/tracking_overhead.py        # 5 rounds, then one JSON line
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, add_budget, alternate, prepare_digits, summarize  # noqa: E402  (bench/ is this script's folder)


def run(work: Path, name: str, tracked: bool, a: argparse.Namespace) -> dict:
    import openclaw
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": None,
        "checkpoint.storage": str(work / "runs"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "tracking.enabled": tracked, "train.max_steps": a.steps, "train.log_every": a.log_every,
        "train.eval_every": 0, "checkpoint.every_steps": a.checkpoint_every, "train.global_batch_size": 256,
        "train.micro_batch_size": 128, "model.kwargs.hidden": a.hidden, "model.kwargs.depth": 3,
        "scaling.min_workers": 2, "scaling.max_workers": 2})
    t0 = time.perf_counter()
    result = openclaw.train(cfg)
    return {"wall_step_s": result.metrics["perf/wall_step_s"], "end_to_end_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds of both sides, in ABBA order (default 5)")
    add_budget(p)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--hidden", type=int, default=1024)
    a = p.parse_args(argv)
    import ray
    names = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="openclaw-tracking-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            runs = alternate({"tracking off": lambda: run(work, f"off-{next(names)}", False, a),
                              "tracking on": lambda: run(work, f"on-{next(names)}", True, a)}, a.repeats, a.budget_s,
                             warmup=True)  # Ray's worker pool (off's), the MLflow database's creation (on's)
        finally:
            ray.shutdown()
    step = summarize(f"wall time per step (metrics every {a.log_every} steps, sent with each checkpoint, every "
                     f"{a.checkpoint_every})",
                     {k: [r["wall_step_s"] * 1e3 for r in v] for k, v in runs.items()}, base="tracking off", unit="ms")
    whole = summarize(f"end to end, the whole openclaw.train call ({a.steps} steps)",
                      {k: [r["end_to_end_s"] for r in v] for k, v in runs.items()}, base="tracking off")
    print(json.dumps({"wall_step": step, "end_to_end": whole, "log_every": a.log_every}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
