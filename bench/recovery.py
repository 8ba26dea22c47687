"""Worker-loss recovery: seconds from a worker SIGKILL to training again after the restore, openclaw
beside a bare Ray Train V2 loop (`../shared/anchors/bare_ray_recovery.py`), in one invocation.

openclaw side: the digits example with 2 CPU workers on a fresh local Ray instance. One training
worker is SIGKILLed right after the first checkpoint is on disk; the figure is the time from the kill
to the `restart` event, which rank 0 records after restoring and just before its first step (a digits
step takes a few milliseconds).

    python bench/recovery.py            # prints both sides and the ratio, then one JSON line
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import first_start_after, prepare_digits, run_events  # noqa: E402  (bench/ is this script's folder)

from node_loss import has_valid_checkpoint  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "anchors" / "bare_ray_recovery.py"


def bare() -> dict:
    r = subprocess.run([sys.executable, str(ANCHOR)], capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1])


def openclaw_side(work: Path) -> dict:
    import psutil
    import ray

    import openclaw
    prepare_digits(work / "digits")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": "recovery", "data.train": str(work / "digits" / "train"), "data.val": str(work / "digits" / "val"),
        "checkpoint.storage": str(work / "runs"), "tracking.uri": uri, "train.max_steps": 3000,
        "checkpoint.every_steps": 100, "train.eval_every": 0, "train.log_every": 100})
    from openclaw.launch.ray_setup import connect_ray
    connect_ray(None, verbose=False, config=cfg)  # a fresh local instance with openclaw's defaults (4 CPUs here)
    killed: dict[str, float] = {}

    def kill():
        run_dir = work / "runs" / "recovery"
        while not has_valid_checkpoint(run_dir):
            time.sleep(0.01)
        victim = next(p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or []))
        os.kill(victim.pid, signal.SIGKILL)
        killed["t"] = time.time()

    threading.Thread(target=kill, daemon=True).start()
    try:
        result = openclaw.train(cfg)
    finally:
        ray.shutdown()
    restart = first_start_after(run_events(uri, result.run_id), killed["t"])
    return {"recovery_s": round(restart["t"] - killed["t"], 2), "resumed_at_step": restart["resumed_from_step"]}


def main() -> int:
    b = bare()
    with tempfile.TemporaryDirectory(prefix="openclaw-recovery-") as d:
        o = openclaw_side(Path(d))
    ratio = o["recovery_s"] / b["recovery_s"]
    print(f"bare Ray Train: {b['recovery_s']:.2f} s from SIGKILL to the first step after restore")
    print(f"openclaw:       {o['recovery_s']:.2f} s from SIGKILL to training again after restore")
    print(f"ratio openclaw / bare: {ratio:.2f}")
    print(json.dumps({"bare_recovery_s": b["recovery_s"], "openclaw_recovery_s": o["recovery_s"],
                      "ratio": round(ratio, 3), "openclaw_resumed_at_step": o["resumed_at_step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
