"""Goodput under repeated worker loss: the same training run uninterrupted and with a training worker
SIGKILLed every `--kill-every` seconds, in one invocation. Goodput = uninterrupted wall-clock time /
wall-clock time with the kills (both from `openclaw.train` call to return, Ray already up).

The workload is the digits MLP made wide (hidden 1024, depth 3) on 2 CPU workers, with asynchronous
checkpoints every `--ckpt-every` steps, sized by `--steps` to run about 10 minutes.

    python bench/goodput.py                        # about 20 minutes: both runs, then one JSON line
    python bench/goodput.py --steps 3000 --kill-every 20   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import first_start_after, prepare_digits, run_events  # noqa: E402  (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, name: str, steps: int, ckpt_every: int):
    import openclaw
    return openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": str(work / "digits" / "val"),
        "checkpoint.storage": str(work / "runs"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "train.max_steps": steps, "train.log_every": 100, "train.eval_every": 0,
        "checkpoint.every_steps": ckpt_every, "checkpoint.keep": 3, "checkpoint.async": True,
        "failure.max_failures": -1, "model.kwargs.hidden": 1024, "model.kwargs.depth": 3,
        "train.optimizer.lr": 5e-4})


def timed_run(work: Path, name: str, steps: int, ckpt_every: int, kill_every: float | None) -> dict:
    import psutil

    import openclaw
    kills: list[float] = []
    done = threading.Event()

    def killer():
        rng = random.Random(0)
        while not done.wait(kill_every):
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                os.kill(rng.choice(workers).pid, signal.SIGKILL)
                kills.append(time.time())

    if kill_every:
        threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    result = openclaw.train(_config(work, name, steps, ckpt_every))
    elapsed = time.perf_counter() - t0
    done.set()
    return {"seconds": elapsed, "kills": kills, "step": result.metrics.get("step"),
            "checkpoint": result.checkpoint, "run_id": result.run_id}


def recoveries(uri: str, run_id: str, kills: list[float]) -> list[dict]:
    """Each kill's recovery, from the run's events: seconds from the kill to training again, and the
    step it resumed from."""
    events = run_events(uri, run_id)
    starts = [(k, first_start_after(events, k)) for k in kills]
    return [{"recovery_s": round(e["t"] - k, 2), "resumed_from_step": e["resumed_from_step"]} for k, e in starts if e]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=15_000, help="training steps (15000: about 10 minutes here)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--kill-every", type=float, default=60.0)
    a = p.parse_args(argv)
    import ray
    import torch

    import openclaw
    with tempfile.TemporaryDirectory(prefix="openclaw-goodput-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            clean = timed_run(work, "clean", a.steps, a.ckpt_every, None)
            faulty = timed_run(work, "faulty", a.steps, a.ckpt_every, a.kill_every)
        finally:
            ray.shutdown()
        same = all(torch.equal(x, y) for x, y in zip(openclaw.load_model(clean["checkpoint"]).state_dict().values(),
                                                      openclaw.load_model(faulty["checkpoint"]).state_dict().values()))
        costs = recoveries(f"sqlite:///{work / 'mlflow.db'}", faulty["run_id"], faulty["kills"])
    goodput = clean["seconds"] / faulty["seconds"]
    print(f"uninterrupted: {clean['seconds']:.1f} s for {a.steps} steps")
    print(f"with a SIGKILL every {a.kill_every:.0f} s: {faulty['seconds']:.1f} s, {len(faulty['kills'])} kills; "
          f"final weights bitwise equal to the uninterrupted run: {same}")
    for i, c in enumerate(costs, 1):
        print(f"  kill {i}: training again {c['recovery_s']:.2f} s later, from step {c['resumed_from_step']}")
    if costs:
        lost = (faulty["seconds"] - clean["seconds"]) / len(faulty["kills"])
        recovery = statistics.fmean(c["recovery_s"] for c in costs)
        print(f"lost per kill: {lost:.1f} s = recovery {recovery:.1f} s (mean) + {lost - recovery:.1f} s of steps "
              f"trained again since the last checkpoint and of slower first steps")
    print(f"goodput: {goodput:.3f}")
    print(json.dumps({"clean_s": round(clean["seconds"], 1), "faulty_s": round(faulty["seconds"], 1),
                      "kills": len(faulty["kills"]), "per_kill": costs, "goodput": round(goodput, 4),
                      "bitwise_equal": same,
                      "steps": a.steps, "finished_step": faulty["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
