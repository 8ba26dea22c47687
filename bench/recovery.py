"""Worker-loss recovery: seconds from a worker SIGKILL to the end of the first training step after the
restore, openclaw beside a bare Ray Train V2 loop (`../shared/anchors/bare_ray_recovery.py`), in one
invocation, with both clocks stopped at the same event.

- openclaw: the digits example with 2 CPU workers on a fresh local Ray instance (4 CPUs). One training
  worker is SIGKILLed once the first checkpoint is on storage; the clock stops at the restarted group's
  `first_step` event, which rank 0 records when its first step after the restore has completed.
- bare: the anchor, with Ray's defaults; the clock stops when rank 0 has written its first step after
  the restore.
- bare, 0.25 s poll: the anchor with `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25`, the controller poll
  openclaw sets (any bare user can set it too).

Every side runs in its own process; the sides alternate (ABBA) over `--repeats` rounds.

    python bench/recovery.py                  # 5 rounds: medians, spreads, ratios, then one JSON line
    python bench/recovery.py --repeats 3      # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (add_budget, alternate, first_start_after, first_step_after, own_train_workers, prepare_digits,  # noqa: E402  (bench/)
                    run_events, run_side, summarize)

from node_loss import has_valid_checkpoint  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "anchors" / "bare_ray_recovery.py"
POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def bare_side(poll: str | None) -> dict:
    """One run of the anchor. It stops its clock at the first step line written after the kill, from any
    rank; rank 0 can write its line of the killed step just after rank 1 wrote the kill, which reads as a
    recovery of 0 s. No restart takes under a second (new processes): such a run is run again, and said."""
    for _ in range(3):
        r = run_side([str(ANCHOR)], {POLL: poll})
        if r["recovery_s"] >= 1.0:
            return r
        print(f"  (the anchor timed rank 0's in-flight step, {r['recovery_s']} s after the kill: run again)",
              file=sys.stderr, flush=True)
    raise RuntimeError("the anchor timed an in-flight step three times in a row")


def openclaw_side(work: Path) -> dict:
    """One openclaw run with a SIGKILL after its first checkpoint (run in a process of its own)."""
    import ray

    import openclaw
    from openclaw.launch.ray_setup import connect_ray
    prepare_digits(work / "digits")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": "recovery", "data.train": str(work / "digits" / "train"), "data.val": str(work / "digits" / "val"),
        "checkpoint.storage": str(work / "runs"), "tracking.uri": uri, "train.max_steps": 1000,
        "checkpoint.every_steps": 100, "train.eval_every": 0, "train.log_every": 100})
    connect_ray(None, verbose=False, config=cfg)  # a fresh local instance with openclaw's defaults (4 CPUs here)
    killed: dict[str, float] = {}

    def kill():
        while not has_valid_checkpoint(work / "runs" / "recovery"):
            time.sleep(0.01)
        victim = own_train_workers()[0]
        os.kill(victim.pid, signal.SIGKILL)
        killed["t"] = time.time()

    threading.Thread(target=kill, daemon=True).start()
    try:
        result = openclaw.train(cfg)
    finally:
        ray.shutdown()
    events = run_events(uri, result.run_id)
    first, restart = first_step_after(events, killed["t"]), first_start_after(events, killed["t"])
    return {"recovery_s": round(first["t"] - killed["t"], 2), "resumed_at_step": first["step"],
            "restart_event_s": round(restart["t"] - killed["t"], 2), "worker_setup_s": first["setup_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds of all three sides, in ABBA order (default 5)")
    add_budget(p)
    p.add_argument("--side", choices=["openclaw"], help=argparse.SUPPRESS)  # one side, in its own process
    a = p.parse_args(argv)
    if a.side:
        with tempfile.TemporaryDirectory(prefix="openclaw-recovery-") as d:
            print(json.dumps(openclaw_side(Path(d))))
        return 0
    runs = alternate({
        "openclaw": lambda: run_side([__file__, "--side", "openclaw"], {POLL: None}),
        "bare Ray Train": lambda: bare_side(None),
        "bare, 0.25 s poll": lambda: bare_side("0.25"),
    }, a.repeats, a.budget_s)
    out = summarize("seconds from a worker SIGKILL to the end of the first step after the restore (openclaw: the "
                    "digits MLP from Parquet, AdamW, checkpoints every 100 steps; bare: the anchor's Linear(64, 1) on "
                    "random tensors, SGD, checkpoints every 5 steps, 0.05 s sleep per step)",
                    {k: [r["recovery_s"] for r in v] for k, v in runs.items()}, base="bare Ray Train")
    for key, what in (("restart_event_s", "kill to the `restart` event (restored, before the first step)"),
                      ("worker_setup_s", "worker entering its loop to the end of its first step")):
        out[f"openclaw_{key}"] = [r[key] for r in runs["openclaw"]]
        print(f"  openclaw, {what}: {out[f'openclaw_{key}']} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
