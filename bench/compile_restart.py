#!/usr/bin/env python
"""Compile time of a restarted worker on a new node: cold (nothing cached) against warm (the run's compile
cache loaded from beside its checkpoints, as `runtime.compile_cache` does on every restart).

    python bench/compile_restart.py                      # text-lm GPT on CPU (Inductor), 5 repeats per side
    python bench/compile_restart.py --device cuda --dim 768 --depth 12

A priming worker compiles the model and saves the cache artifacts into a run folder. Then each repeat
starts two fresh worker processes, each with an empty local Inductor cache (as on a node that never ran
the job): `cold` compiles from nothing, `warm` first loads the run's artifacts. Each trains 2 steps with
`train.compile: true` and reports the engine's `perf/compile_s` (the wall time of the steps that
compiled) plus, on the warm side, the time it took to load the cache (a restart pays both), and cache
hits. The sides alternate (ABBA); medians, spread and the cold/warm ratio are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_budget, alternate  # (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]


def child(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "platform"))
    import torch

    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.models import GPT
    from openclaw.engine.tasks import LanguageModeling
    try:
        from openclaw.runtime.compile_cache import CompileCache
    except ImportError:  # a GPU box with torch alone (no pyarrow): the same artifacts, in a local folder
        CompileCache = _LocalCompileCache

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cache = CompileCache(a.run_dir, rank=0)
    t0 = time.perf_counter()
    loaded = cache.load() if a.load else 0
    load_s = time.perf_counter() - t0  # a restart pays it: it is part of the warm side's time
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=a.block, dim=a.dim, depth=a.depth, heads=a.heads).to(device)
    engine = Engine(model, LanguageModeling(), TrainConfig(global_batch_size=16, micro_batch_size=8, compile=True,
                                                           max_steps=100), device=device)
    x = torch.randint(0, 256, (16, a.block + 1), generator=torch.Generator().manual_seed(1)).to(device)
    for step in range(2):
        engine.train_step(step, [{"x": x[:8]}, {"x": x[8:]}])
    saved = cache.save() if a.save else 0
    print(json.dumps({**engine.compile_counters.metrics(), "loaded_artifacts": loaded, "saved_bytes": saved,
                      "load_s": load_s}))


class _LocalCompileCache:
    """`runtime.compile_cache.CompileCache` for a local folder, without pyarrow."""

    def __init__(self, run_dir: str, rank: int):
        self.path = Path(run_dir) / "compile_cache" / f"rank{rank}.bin"

    def load(self) -> int:
        import torch
        if not self.path.exists():
            return 0
        info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        return sum(len(v) for v in info.artifacts.values()) if info is not None else 0

    def save(self) -> int:
        import torch
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(artifacts[0])
        return len(artifacts[0])


def run_child(a: argparse.Namespace, run_dir: str, *, load: bool, save: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:  # a node that never compiled this
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton")}
        cmd = [sys.executable, __file__, "--child", "--run-dir", run_dir, "--device", a.device, "--threads",
               str(a.threads), "--dim", str(a.dim), "--depth", str(a.depth), "--heads", str(a.heads), "--block",
               str(a.block)] + (["--load"] if load else []) + (["--save"] if save else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode:
        sys.exit(f"worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    add_budget(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return 0
    with tempfile.TemporaryDirectory(prefix="openclaw-run-") as run_dir:
        prime = run_child(a, run_dir, load=False, save=True)
        print(f"priming worker: compiled in {prime['perf/compile_s']:.1f} s, saved {prime['saved_bytes']:,} bytes "
              f"of cache artifacts")
        runs = alternate({side: (lambda side=side: run_child(a, run_dir, load=side == "warm", save=False))
                          for side in ("cold", "warm")}, a.repeats, a.budget_s)
        for cold, warm in zip(runs["cold"], runs["warm"]):
            print(f"  cold {cold['perf/compile_s']:.2f} s, warm {warm['perf/compile_s']:.2f} s + {warm['load_s']:.2f} s "
                  f"loading the cache ({warm['perf/compile_cache_hits']} cache hits, {warm['loaded_artifacts']} "
                  f"artifacts loaded)")
    secs = {side: [x["perf/compile_s"] + x["load_s"] for x in v] for side, v in runs.items()}
    med = {side: statistics.median(v) for side, v in secs.items()}
    for side, v in secs.items():
        print(f"{side:>5}: median compile + cache load {med[side]:.2f} s (min {min(v):.2f}, max {max(v):.2f}); cache hits "
              f"{[x['perf/compile_cache_hits'] for x in runs[side]]}")
    ratio = med["cold"] / med["warm"]
    print(f"cold / warm: {ratio:.2f}x (target: at least 3x)")
    print(json.dumps({"device": a.device, "model": f"gpt dim {a.dim} depth {a.depth} block {a.block}",
                      "cold_s": secs["cold"], "warm_s": secs["warm"], "ratio_cold_over_warm": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
