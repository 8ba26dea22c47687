"""Checkpoint cost: what checkpoints cost training, with no checkpoints, synchronous checkpoints and
`checkpoint.async`, in one invocation.

All three sides train the same MLP (by default 25 M float32 parameters, 101 MB; with AdamW's two moments a
checkpoint is about 300 MB) on the digits data, on one Ray Train worker (2 CPUs) of one local Ray
instance, saving every `--every` steps (the no-checkpoint side saves only at the end). Two figures per run:

- `perf/wall_step_s`: the loop's wall time per step up to the last step, everything included (the steps,
  logging, and every periodic checkpoint: for async saves, also the steps slowed down while the
  background thread serializes, checksums and writes on the same cores). The final checkpoint, the same
  on all sides, is after it. The overhead of a side is its wall time per step minus the no-checkpoint
  side's; the headline ratio is async overhead over sync overhead.
- `perf/checkpoint_stall_s`: the time the loop itself waits per checkpoint (sync: serialize, checksum,
  copy and report; async: the host snapshot plus the later report).

The sides alternate (ABBA) over `--repeats` rounds; medians, spreads (min-max) and ratios of medians.

    python bench/checkpoint_stall.py              # 5 rounds, then one JSON line
    python bench/checkpoint_stall.py --repeats 3  # quicker
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import add_budget, alternate, figure, prepare_digits, summarize  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]
SIDES = {"no checkpoints": None, "sync": False, "async": True}
"""Each side's `checkpoint.async` (None: no periodic checkpoint)."""


def run(work: Path, name: str, background: bool | None, a: argparse.Namespace) -> dict:
    import openclaw
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": None,
        "checkpoint.storage": str(work / "runs"), "tracking.uri": uri, "train.max_steps": a.steps,
        "checkpoint.every_steps": a.every if background is not None else a.steps + 1, "checkpoint.keep": 2,
        "checkpoint.async": bool(background), "train.log_every": a.every, "train.eval_every": 0,
        "scaling.min_workers": 1, "scaling.max_workers": 1, "scaling.resources_per_worker": {"CPU": 2},
        "model.kwargs.hidden": a.hidden, "model.kwargs.depth": 2})
    result = openclaw.train(cfg)
    history = MlflowClient(uri).get_metric_history(result.run_id, "perf/checkpoint_stall_s")
    stalls = [m.value for m in sorted(history, key=lambda m: m.step) if m.step < a.steps]
    return {"wall_step_s": result.metrics["perf/wall_step_s"],
            "stall_s": statistics.median(stalls) if stalls else 0.0, "checkpoints": len(stalls)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=130)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--hidden", type=int, default=5000, help="MLP width: 5000 gives 25 M parameters (101 MB)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the three sides, in ABBA order (default 5)")
    add_budget(p)
    a = p.parse_args(argv)
    import ray
    import torch

    from openclaw.engine.models import build_model
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model("mlp", {"in_features": 64, "hidden": a.hidden, "depth": 2,
                                                            "num_classes": 10}).parameters())
    size = f"{params * 12 / 1e6:.0f} MB checkpoints every {a.every} of {a.steps} steps"  # weights and AdamW's 2 moments
    print(f"model: {params / 1e6:.1f} M float32 parameters: {size}", flush=True)
    rounds = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="openclaw-stall-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            runs = alternate({side: (lambda bg=bg: run(work, f"run-{next(rounds)}", bg, a))
                              for side, bg in SIDES.items()}, a.repeats, a.budget_s)
        finally:
            ray.shutdown()
    wall = summarize(f"wall time per step, checkpoints included ({size})",
                     {k: [r["wall_step_s"] for r in v] for k, v in runs.items()}, base="no checkpoints", digits=4)
    stall = summarize(f"stall per checkpoint, the loop waiting ({size})",
                      {k: [r["stall_s"] for r in v] for k, v in runs.items() if k != "no checkpoints"},
                      base="sync", digits=4)
    # Each round's overhead against the same round's no-checkpoint run, then medians over the rounds.
    over = figure(f"overhead per step over the same round's run with no checkpoints ({size})",
                  {k: [1e3 * (r["wall_step_s"] - n["wall_step_s"]) for r, n in zip(runs[k], runs["no checkpoints"])]
                   for k in ("sync", "async")}, base="sync", unit="ms", digits=1)
    print(over["figure"])
    for k, v in over["sides"].items():
        print(f"  {k:<30} median {v['median']:.1f} ms (min {v['min']:.1f}, max {v['max']:.1f})")
    ratio = over["sides"]["async"]["ratio"]
    print(f"ratio async / sync overhead: {ratio}" if ratio is not None else
          "ratio async / sync overhead: n/a (the sync overhead's median is at or below 0, within the noise; "
          "save more often, or run more rounds)")
    print(json.dumps({"wall_step": wall, "stall": stall, "overhead": over}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
