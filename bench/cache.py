"""Prepared-data cache: time to the first training step with an expensive transform, on a cache miss
and on a cache hit, measured in one run.

    python bench/cache.py [--rows 200000] [--rounds 1500] [--pairs 3]

Each pair uses a fresh cache folder: run A prepares the data (miss), run B finds it (hit). The time is
`perf/time_to_first_step_s`, from the start of `openclaw.train` to the end of the first step: data
checks, preparation or cache lookup, worker start and the step. One worker, tracking off. Medians of
the pairs; the ratio is miss / hit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=1500, help="tanh layers of the transform (its cost)")
    ap.add_argument("--pairs", type=int, default=3)
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
    misses, hits = [], []
    for i in range(args.pairs):
        cache = work / f"cache-{i}"
        misses.append(openclaw.train(config(f"miss-{i}", cache)).metrics["perf/time_to_first_step_s"])
        hits.append(openclaw.train(config(f"hit-{i}", cache)).metrics["perf/time_to_first_step_s"])
        prep = max(json.loads(m.read_text())["prepare_s"] for m in cache.glob("entries/*/manifest.json"))
        print(f"pair {i}: miss {misses[-1]:.1f} s (of which preparation {prep:.1f} s), hit {hits[-1]:.1f} s", flush=True)
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(f"time to first step with a {args.rounds}-round transform over {args.rows:,} rows: cache miss {miss:.1f} s, "
          f"cache hit {hit:.1f} s, hit is {miss / hit:.1f}x faster (medians of {args.pairs})", flush=True)
    print(json.dumps({"miss_s": round(miss, 2), "hit_s": round(hit, 2), "ratio": round(miss / hit, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
