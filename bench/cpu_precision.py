#!/usr/bin/env python
"""Does bf16 autocast train faster than fp32 on this machine's CPUs? The engine, in one process, on the
shipped examples' models (digits MLP, text-lm GPT) at their batch sizes, fp32 against bf16 autocast.

    python bench/cpu_precision.py                 # 5 repeats of 30 steps per side and model
    python bench/cpu_precision.py --threads 2

Both sides start from the same weights and train on the same pre-generated batches; repeats alternate
the sides (ABBA) and each side's median samples/s is printed with its spread and the bf16/fp32 ratio.
`precision: auto` trains CPUs in fp32 because of what this prints (see engine/precision.py). No Ray.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from common import alternate  # noqa: E402  (bench/ is this script's folder)

from openclaw.engine.config import TrainConfig  # noqa: E402
from openclaw.engine.engine import Engine  # noqa: E402
from openclaw.engine.models import GPT, MLP  # noqa: E402
from openclaw.engine.tasks import Classification, LanguageModeling  # noqa: E402

MODELS = {  # the shipped configs (jobs/configs/digits.yaml, text-lm.yaml)
    "digits-mlp": (lambda: MLP(in_features=64, hidden=128, depth=2, num_classes=10), Classification, 64, 16),
    "text-lm-gpt": (lambda: GPT(vocab_size=256, block_size=128, dim=128, depth=3, heads=4), LanguageModeling, 32, 16),
}


def batches(name: str, global_batch: int, micro: int, n: int = 4) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        if name == "text-lm-gpt":
            x = torch.randint(0, 256, (global_batch, 129), generator=g)
            out.append([{"x": c} for c in x.split(micro)])
        else:
            x, y = torch.randn(global_batch, 64, generator=g), torch.randint(0, 10, (global_batch,), generator=g)
            out.append([{"x": a, "y": b} for a, b in zip(x.split(micro), y.split(micro))])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (as `train.threads_per_worker`)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    summary = {"threads": a.threads, "steps": a.steps, "repeats": a.repeats}
    for name, (build, task, global_batch, micro) in MODELS.items():
        torch.manual_seed(0)
        base = build()
        data = batches(name, global_batch, micro)
        engines = {prec: Engine(copy.deepcopy(base), task(), TrainConfig(global_batch_size=global_batch,
                                micro_batch_size=micro, precision=prec, max_steps=10 ** 6), device=torch.device("cpu"))
                   for prec in ("fp32", "bf16")}
        done = {prec: 0 for prec in engines}

        def run(prec: str) -> float:
            engine = engines[prec]
            for _ in range(3):  # warm-up, untimed
                engine.train_step(done[prec], data[done[prec] % 4])
                done[prec] += 1
            t0 = time.perf_counter()
            for _ in range(a.steps):
                engine.train_step(done[prec], data[done[prec] % 4])
                done[prec] += 1
            return a.steps * global_batch / (time.perf_counter() - t0)

        runs = alternate({prec: (lambda prec=prec: run(prec)) for prec in ("fp32", "bf16")}, a.repeats)
        med = {prec: statistics.median(v) for prec, v in runs.items()}
        for prec, v in runs.items():
            print(f"{name:>12} {prec}: median {med[prec]:9.1f} samples/s (min {min(v):.1f}, max {max(v):.1f})")
        ratio = med["bf16"] / med["fp32"]
        print(f"{name:>12} bf16 / fp32: {ratio:.3f}")
        summary[name] = {"fp32_samples_per_s": round(med["fp32"], 1), "bf16_samples_per_s": round(med["bf16"], 1),
                         "ratio_bf16_over_fp32": round(ratio, 3), "fp32_runs": [round(x, 1) for x in runs["fp32"]],
                         "bf16_runs": [round(x, 1) for x in runs["bf16"]]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
