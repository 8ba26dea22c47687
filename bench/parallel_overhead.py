#!/usr/bin/env python
"""Throughput and memory of FSDP2, tensor and pipeline parallelism against DDP: the engine alone (no Ray),
on the same GPT, data and global batch, in one invocation.

    python bench/parallel_overhead.py                              # CPU: 2 gloo ranks, 5 repeats
    python bench/parallel_overhead.py --memory                     # state bytes per rank, text-lm GPT
    python bench/parallel_overhead.py --preset gpu                 # one GPU: FSDP2 vs DDP, >= 1B GPT, bf16, compile
    python bench/parallel_overhead.py --sides ddp,tp,tp-gathered --vocab 16384   # loss parallelism's gain
    python bench/parallel_overhead.py --sides ddp,pp-2mb,pp-8mb,pp-16mb          # the pipeline's bubble

One group of ranks (`openclaw.engine.parallel.local`) runs every side: each repeat, each side builds
the same seeded model under its strategy, trains `--warmup` untimed steps, then times `--steps` steps
from a barrier to a barrier after the last optimizer step (the clocks of every side stop at that event).
Sides alternate their order between repeats (ABBA); the median, the spread (min-max) and the ratio of
medians to DDP are printed,
and the last line is one JSON object. On a GPU, MFU uses the model's FLOPs per token and the device's
dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import STARTED, add_budget  # (bench/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

SIDES = {  # name -> parallelism section; every side runs on --world ranks
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "tp": {"strategy": "ddp", "tensor": 2},
    "tp-gathered": {"strategy": "ddp", "tensor": 2, "loss_parallel": False},  # logits gathered whole for the loss
    "pp": {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "1f1b"},
    # the same pipeline with the rank's batch cut into 2, 8 or 16 pipeline micro-batches (`pp`: the accumulation)
    **{f"pp-{n}mb": {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "1f1b", "microbatches": n} for n in (2, 8, 16)},
}
PRESETS = {
    "cpu": dict(dim=256, depth=4, heads=8, block=128, vocab=256, global_batch=16, micro_batch=4, world=2,
                sides="ddp,fsdp,tp,pp", precision="fp32", compile=False),
    # about 1.2B parameters: dim 2048 x 24 blocks; one GPU, so FSDP2 shards over one rank (its overhead alone)
    "gpu": dict(dim=2048, depth=24, heads=16, block=2048, vocab=50304, global_batch=16, micro_batch=4, world=1,
                sides="ddp,fsdp", precision="bf16", compile=True),
}


def rank_sides(rank: int, world: int, a: dict) -> dict[str, list[dict]]:
    """Every side on one rank, alternated over the repeats (`common.alternate`). The ranks agree on when
    the budget ends: the clock is rank 0's, broadcast. On a CPU the peak RSS of a process that ran every
    side says nothing of one side (`--memory` runs one per process); on a GPU it is reset per side."""
    import torch
    import torch.distributed as dist

    from common import alternate

    def clock() -> float:
        now = [time.time()]
        dist.broadcast_object_list(now, src=0)
        return now[0]

    def side(name: str) -> dict:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = rank_run(rank, world, SIDES[name], a)
        return out if torch.cuda.is_available() else {**out, "peak_memory_bytes": None}
    return alternate({name: (lambda name=name: side(name)) for name in a["sides"].split(",")}, a["repeats"],
                     a.get("budget_s"), clock=clock, started=a["started"])


def rank_run(rank: int, world: int, spec: dict, a: dict) -> dict:
    """One side on one rank: train, time, measure."""
    import torch
    import torch.distributed as dist

    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.flops import device_peak_flops, mfu, training_flops
    from openclaw.engine.metrics import peak_memory_bytes
    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.build import build_strategy, layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling

    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    cfg = ParallelismConfig(**spec)
    layout = layout_for(cfg, world)
    torch.manual_seed(0)
    model = GPT(vocab_size=a["vocab"], block_size=a["block"], dim=a["dim"], depth=a["depth"], heads=a["heads"])
    train = TrainConfig(global_batch_size=a["global_batch"], micro_batch_size=a["micro_batch"], max_steps=10_000,
                        precision=a["precision"], optimizer={"name": "adamw", "lr": 3e-4, "weight_decay": 0.1})
    bf16 = a["precision"] == "bf16"
    engine = Engine(model, LanguageModeling(), train, device=device, world_size=layout.dp,
                    global_batch_size=a["global_batch"],
                    strategy=build_strategy(cfg, world=world, rank=rank, device=device, split_logits_ok=True,
                                            param_dtype=torch.bfloat16 if bf16 else None))
    if a["compile"]:
        for block in engine.module.blocks.values():
            block.compile()
    per = a["global_batch"] // layout.dp
    g = torch.Generator().manual_seed(1 + layout.dp_rank(rank))
    data = torch.randint(0, a["vocab"], (4, per, a["block"] + 1), generator=g)
    micro = [[{"x": data[i % 4][j:j + a["micro_batch"]]} for j in range(0, per, a["micro_batch"])] for i in range(4)]
    with torch.device("meta"):  # FLOPs per sample, as the platform counts them: on a meta copy of the model
        meta = GPT(vocab_size=a["vocab"], block_size=a["block"], dim=a["dim"], depth=a["depth"], heads=a["heads"])
    flops_per_sample = training_flops(meta, LanguageModeling().loss, {"x": micro[0][0]["x"].to("meta")}) / a["micro_batch"]
    for step in range(a["warmup"]):
        engine.train_step(step, micro[step % 4])
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(a["steps"]):
        engine.train_step(a["warmup"] + step, micro[step % 4])
    _sync(device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    tokens_per_s = a["steps"] * a["global_batch"] * a["block"] / seconds
    peak = device_peak_flops(device, engine.precision.name, engine.precision.tf32)
    samples_per_s = a["steps"] * a["global_batch"] / seconds
    return {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
            "mfu": mfu(samples_per_s * flops_per_sample, peak, world),
            "state_bytes": engine.state_bytes, "peak_memory_bytes": peak_memory_bytes(device),
            "params": sum(p.numel() for p in model.parameters())}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(a: dict) -> dict[str, list[dict]]:
    """Every side's repeats, each the rank with the most state (the ranks' step times are one, barrier to
    barrier)."""
    from openclaw.engine.parallel.local import run_local
    per_rank = run_local(a["world"], rank_sides, a, threads=a["threads"])
    runs = {side: [max((r[side][i] for r in per_rank), key=lambda x: x["state_bytes"] and sum(x["state_bytes"].values()))
                   for i in range(len(per_rank[0][side]))] for side in per_rank[0]}
    for side, rs in runs.items():
        print(f"  {side}: {[round(r['samples_per_s'], 1) for r in rs]} samples/s", flush=True)
    return runs


def report(a: dict, runs: dict[str, list[dict]]) -> dict:
    base = statistics.median(r["samples_per_s"] for r in runs["ddp"])
    out = {"preset": a["preset"], "world": a["world"], "params": runs["ddp"][0]["params"], "vocab": a["vocab"],
           "sides": {}}
    print(f"\n{runs['ddp'][0]['params'] / 1e6:.1f}M-parameter GPT, {a['world']} rank(s), global batch "
          f"{a['global_batch']} x {a['block']} tokens, {a['precision']}, median of {len(runs['ddp'])}")
    print(f"{'side':11} {'samples/s':>10} {'spread':>17} {'ratio':>6} {'state MB/rank':>14} {'peak MB':>9}  MFU")
    for side, rs in runs.items():
        sps = [r["samples_per_s"] for r in rs]
        med, state = statistics.median(sps), sum(rs[0]["state_bytes"].values())
        mfu = statistics.median(r["mfu"] for r in rs) if rs[0]["mfu"] is not None else None
        peak = max(r["peak_memory_bytes"] for r in rs) if rs[0]["peak_memory_bytes"] is not None else None
        print(f"{side:11} {med:10.1f} {min(sps):8.1f}-{max(sps):8.1f} {med / base:6.3f} {state / 1e6:14.2f} "
              f"{f'{peak / 1e6:9.0f}' if peak is not None else '      n/a'}  {f'{mfu:.1%}' if mfu is not None else 'n/a (no known peak)'}")
        out["sides"][side] = {"samples_per_s": sps, "median": med, "ratio": med / base, "state_bytes": state,
                              "peak_memory_bytes": peak, "mfu": mfu}
    if {"tp", "tp-gathered"} <= set(runs):  # loss parallelism against logits gathered whole, the same tp
        gain = out["sides"]["tp"]["median"] / out["sides"]["tp-gathered"]["median"]
        print(f"tp (loss parallel) / tp-gathered: {gain:.3f}")
        out["tp_over_tp_gathered"] = gain
    return out


def memory_table(a: dict) -> dict:
    """State bytes per rank of the text-lm GPT (jobs/configs/text-lm.yaml) at 1 and 2 ranks, DDP and FSDP."""
    from openclaw.engine.parallel.local import run_local
    text_lm = dict(a, dim=128, depth=3, heads=4, block=128, vocab=256, global_batch=32, micro_batch=16, steps=1,
                   warmup=1, compile=False, precision="fp32")
    rows = {}
    print("text-lm GPT (dim 128 x 3 blocks): bytes per rank after a step")
    print(f"{'strategy':8} {'ranks':>5} {'params':>10} {'grads':>10} {'optimizer':>10} {'total':>10} {'peak RSS MB':>12}")
    for strategy in ("ddp", "fsdp"):
        for world in (1, 2):
            r = max(run_local(world, rank_run, {"strategy": strategy}, text_lm),
                    key=lambda x: sum(x["state_bytes"].values()))
            b = r["state_bytes"]
            rows[f"{strategy}-{world}"] = {**b, "peak_memory_bytes": r["peak_memory_bytes"]}
            print(f"{strategy:8} {world:5} {b['params']:10,} {b['grads']:10,} {b['optimizer']:10,} "
                  f"{sum(b.values()):10,} {r['peak_memory_bytes'] / 1e6:12.0f}")
    ratio = sum(rows["fsdp-2"][k] for k in ("params", "grads", "optimizer")) / \
        sum(rows["ddp-2"][k] for k in ("params", "grads", "optimizer"))
    print(f"FSDP / DDP state per rank at 2 ranks: {ratio:.3f}")
    return {"memory": rows, "fsdp_over_ddp_at_2": ratio}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    p.add_argument("--sides", default=None, help=f"comma-separated, of {', '.join(SIDES)} (ddp is the baseline)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (CPU)")
    p.add_argument("--vocab", type=int, default=None, help="the GPT's vocabulary (default: the preset's)")
    p.add_argument("--memory", action="store_true", help="only the state-bytes table of the text-lm GPT")
    add_budget(p)
    args = p.parse_args(argv)
    a = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None},
         "started": time.time() - (time.monotonic() - STARTED)}  # the ranks' clock is the wall clock
    if "ddp" not in a["sides"].split(","):
        p.error("--sides must include ddp, the baseline")
    if a["preset"] == "gpu":
        import torch
        if not torch.cuda.is_available():
            sys.exit("--preset gpu needs a CUDA device; none is visible. The GPU figures are not measured here.")
    out = memory_table(a) if args.memory else report(a, measure(a))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
