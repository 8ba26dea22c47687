"""Goodput under repeated worker loss: a training worker SIGKILLed every `--kill-every` seconds, two ways,
in one invocation.

- Within the faulty run: useful step time / wall-clock time. Useful step time is the training time of
  the steps whose results the run kept: the log windows MLflow holds (a failed attempt's windows after
  its last checkpoint are never published; their steps are trained again). Logs fall on the checkpoint
  grid (`train.log_every` = `checkpoint.every_steps`), so each published window is exactly the steps
  from one checkpoint to the next. Wall-clock time is the `openclaw.train` call, Ray already up.
  The same ratio for the clean runs shows what start-up, evaluation and the final save cost without faults.
- Against clean runs: the median wall-clock time of the uninterrupted runs over that of the faulty runs,
  the two alternating (clean, faulty, faulty, clean, ...) over `--repeats` rounds.

The workload is the digits MLP made wide (hidden 1024, depth 3) on 2 CPU workers, with asynchronous
checkpoints every `--ckpt-every` steps, sized by `--steps` (15000: about 10 minutes a run here).

    python bench/goodput.py                                      # 2 rounds (4 runs, about 40 minutes)
    python bench/goodput.py --steps 4000 --kill-every 30         # quicker
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

from common import (add_budget, alternate, first_start_after, first_step_after, own_train_workers, prepare_digits,  # noqa: E402
                    run_events, summarize)

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, name: str, steps: int, ckpt_every: int):
    import openclaw
    return openclaw.load_config(REPO / "jobs" / "configs" / "digits.yaml", {
        "name": name, "data.train": str(work / "digits" / "train"), "data.val": str(work / "digits" / "val"),
        "checkpoint.storage": str(work / "runs"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "train.max_steps": steps, "train.log_every": ckpt_every, "train.eval_every": 0,
        "checkpoint.every_steps": ckpt_every, "checkpoint.keep": 3, "checkpoint.async": True,
        "failure.max_failures": -1, "failure.max_same_error": 0,  # the kills are on purpose: never give up
        "model.kwargs.hidden": 1024, "model.kwargs.depth": 3,
        "train.optimizer.lr": 5e-4})


def timed_run(work: Path, name: str, steps: int, ckpt_every: int, kill_every: float | None) -> dict:
    import openclaw
    kills: list[float] = []
    done = threading.Event()

    def killer():
        rng = random.Random(0)
        while not done.wait(kill_every):
            workers = own_train_workers()
            if workers:
                os.kill(rng.choice(workers).pid, signal.SIGKILL)
                kills.append(time.time())

    if kill_every:
        threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    result = openclaw.train(_config(work, name, steps, ckpt_every))
    elapsed = time.perf_counter() - t0
    done.set()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    useful = useful_step_s(uri, result.run_id, ckpt_every)
    return {"seconds": elapsed, "kills": kills, "step": result.metrics.get("step"), "useful_s": useful,
            "checkpoint": result.checkpoint, "run_id": result.run_id,
            "per_kill": recoveries(uri, result.run_id, kills)}


def useful_step_s(uri: str, run_id: str, log_every: int) -> float:
    """Training time of the kept steps: each published log window's samples over its samples/s."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(run_id, "train/samples_per_s"), key=lambda m: m.step)
    steps = [m.step for m in history]
    assert steps == list(range(log_every, log_every * len(steps) + 1, log_every)), f"log windows off the grid: {steps}"
    global_batch = int(client.get_run(run_id).data.params["train.global_batch_size"])
    return sum(log_every * global_batch / m.value for m in history)


def recoveries(uri: str, run_id: str, kills: list[float]) -> list[dict]:
    """Each kill's recovery, from the run's events: seconds from the kill to the end of the first step
    after the restore, and the step it resumed from."""
    events = run_events(uri, run_id)
    starts = [(k, first_start_after(events, k), first_step_after(events, k)) for k in kills]
    return [{"recovery_s": round(f["t"] - k, 2), "resumed_from_step": e["resumed_from_step"]}
            for k, e, f in starts if e and f]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=15_000, help="training steps (15000: about 10 minutes here)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--kill-every", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=2, help="rounds of a clean and a faulty run, in ABBA order "
                                                          "(default 2: 4 runs of about 10 minutes each)")
    add_budget(p)
    a = p.parse_args(argv)
    import ray
    import torch

    import openclaw
    names = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="openclaw-goodput-") as d:
        work = Path(d)
        prepare_digits(work / "digits")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            runs = alternate({
                "uninterrupted": lambda: timed_run(work, f"clean-{next(names)}", a.steps, a.ckpt_every, None),
                f"a SIGKILL every {a.kill_every:g} s": lambda: timed_run(work, f"faulty-{next(names)}", a.steps,
                                                                        a.ckpt_every, a.kill_every)}, a.repeats, a.budget_s)
        finally:
            ray.shutdown()
        clean, faulty = runs.values()
        weights = [openclaw.load_model(r["checkpoint"]).state_dict() for r in clean + faulty]
        same = all(torch.equal(w[k], weights[0][k]) for w in weights for k in w)
    for r in faulty:
        print(f"faulty run: {r['seconds']:.1f} s, {len(r['kills'])} kills, finished at step {r['step']}")
        for i, c in enumerate(r["per_kill"], 1):
            print(f"  kill {i}: training again {c['recovery_s']:.2f} s later, from step {c['resumed_from_step']}")
    kills = f"the faulty runs' kills that landed: {[len(r['per_kill']) for r in faulty]}"  # (in the title: a short
    # run may end before its first kill, and then its figures say nothing about recovery)
    walls = summarize(f"wall-clock seconds, the whole run ({kills})",
                      {k: [r["seconds"] for r in v] for k, v in runs.items()}, base="uninterrupted", digits=1)
    within = summarize(f"within each run: useful step time / wall-clock time ({kills})",
                       {k: [r["useful_s"] / r["seconds"] for r in v] for k, v in runs.items()},
                       base="uninterrupted", unit="", digits=3)
    name = next(k for k in runs if k != "uninterrupted")
    against = statistics.median(r["seconds"] for r in clean) / statistics.median(r["seconds"] for r in faulty)
    print(f"goodput within the faulty runs (median): {within['sides'][name]['median']:.3f}; "
          f"against the clean runs (median wall-clock, clean / faulty): {against:.3f}; "
          f"every final model bitwise equal: {same}")
    print(json.dumps({"wall": walls, "within": within, "goodput_against_clean": round(against, 4),
                      "goodput_within": within["sides"][name]["median"], "bitwise_equal": same,
                      "kills": [len(r["kills"]) for r in faulty], "steps": a.steps,
                      "finished_steps": [r["step"] for r in clean + faulty]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
