"""Prepared-data cache: time to the first training step with an expensive transform, on a cache miss
and on a cache hit, measured in one invocation.

    python bench/cache.py [--rows 200000] [--rounds 1500] [--repeats 5]

The hit side reads one cache, prepared once before the measured runs; every miss side prepares into a
fresh cache folder. The two sides alternate (ABBA: miss, hit, hit, miss, ...), so neither always runs
first. The time is `perf/time_to_first_step_s`, from the start of `openclaw.train` to the end of the
first step: data checks, preparation or cache lookup, worker start and the step. One worker, tracking
off. Medians, spreads (min-max) and the ratio of medians, miss / hit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))
from common import add_budget, alternate, summarize  # noqa: E402  (bench/ is this script's folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=1500, help="tanh layers of the transform (its cost)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of both sides, in ABBA order (default 5)")
    add_budget(ap)
    args = ap.parse_args()
    import openclaw
    from openclaw.launch.ray_setup import connect_ray
    work = Path(tempfile.mkdtemp(prefix="openclaw-cache-bench-"))
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "synthetic", "--out", str(work / "data"),
                    "--rows", str(args.rows), "--features", "64"], check=True, capture_output=True)

    def config(name: str, cache: Path):
        return openclaw.load_config(base={
            "name": name, "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": 64, "depth": 1,
                                                               "num_classes": 10}},
            "data": {"train": str(work / "data" / "train"), "cache": {"dir": str(cache)},
                     "transforms": [{"op": "map_batches", "fn": "expensive_transform:random_features",
                                     "kwargs": {"rounds": args.rounds}}]},
            "train": {"global_batch_size": 64, "micro_batch_size": 64, "max_steps": 1, "log_every": 1,
                      "eval_every": 0},
            "scaling": {"min_workers": 1, "max_workers": 1}, "checkpoint": {"storage": str(work / "runs")},
            "tracking": {"enabled": False}})

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
    connect_ray(None, False, config("warm", work / "c"))  # Ray's own start is not part of either side
    openclaw.train(config("prepare-hit-cache", work / "hit-cache"))  # the hit side's cache, prepared once
    runs = iter(range(10**6))

    def miss() -> dict:
        i = next(runs)
        cache = work / f"cache-{i}"
        t = openclaw.train(config(f"miss-{i}", cache)).metrics["perf/time_to_first_step_s"]
        prep = max(json.loads(m.read_text())["prepare_s"] for m in cache.glob("entries/*/manifest.json"))
        return {"s": t, "prepare_s": prep}

    def hit() -> dict:
        return {"s": openclaw.train(config(f"hit-{next(runs)}", work / "hit-cache")).metrics["perf/time_to_first_step_s"]}

    got = alternate({"cache miss": miss, "cache hit": hit}, args.repeats, args.budget_s)
    out = summarize(f"seconds to the first step, a {args.rounds}-round transform over {args.rows:,} rows",
                    {k: [r["s"] for r in v] for k, v in got.items()}, base="cache hit", digits=2)
    out["prepare_s"] = [round(r["prepare_s"], 1) for r in got["cache miss"]]
    print(f"  of each miss, preparation (Ray Data tasks): {out['prepare_s']} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
