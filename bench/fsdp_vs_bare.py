#!/usr/bin/env python
"""openclaw's engine under FSDP2 and DDP against a bare FSDP2 / DDP loop (`../shared/anchors/
bare_fsdp2_loop.py`), on the same model, data and optimizer, in one invocation.

    python bench/fsdp_vs_bare.py                          # 2 gloo ranks on CPU, fsdp and ddp, 5 repeats
    python bench/fsdp_vs_bare.py --strategies fsdp --steps 10 --warmup 2
    python bench/fsdp_vs_bare.py --world 8 --dim 2048 --depth 16 --block 1024   # 8 GPUs: nccl, bf16

Every side is a `torchrun --standalone` of `--world` ranks. The bare side is the anchor as it is; the
openclaw side (this file with `--side openclaw`, under the same torchrun) imports the anchor's model
class, builds it from the same seed, and trains it with `openclaw.engine.Engine` and the strategy
`parallelism.strategy` names (`build_strategy`): each block and the root `fully_shard`-ed, or DDP. Both
sides feed the same random tokens (rank r's generator seeded r), per rank `--batch` samples in one
micro-batch, AdamW at 3e-4 with the anchor's betas and weight decay (openclaw exempts biases and norms
from the decay: the one difference in the update) and the global gradient norm clipped to 1.0. On a
GPU the anchor autocasts to bf16 and openclaw trains `precision: bf16` (which, under FSDP2, also
gathers the parameters in bf16).

Both clocks run from a barrier after `--warmup` untimed steps to a barrier after the last optimizer
step; process start-up is outside both. Each side prints rank 0's parameter and optimizer bytes, read
by the anchor's own `local_bytes` after the last step, and rank 0's last loss. The sides alternate
(ABBA) over `--repeats` rounds; the median, the spread (min-max) and the ratio of medians are printed,
and the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "anchors" / "bare_fsdp2_loop.py"
VOCAB, HEADS = 256, 4
"""The anchor's vocabulary and attention heads (fixed in it)."""


def anchor_module():
    """The anchor, imported from its file (its model class and its byte count)."""
    spec = importlib.util.spec_from_file_location("bare_fsdp2_loop", ANCHOR)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def openclaw_side(a: argparse.Namespace) -> None:
    """One rank of the openclaw side, under torchrun: the anchor's loop, with `Engine.train_step` as the
    step. Prints the anchor's JSON line (rank 0)."""
    sys.path.insert(0, str(REPO / "platform"))
    import torch
    import torch.distributed as dist

    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling

    bare = anchor_module()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = bare.LM(VOCAB, a.dim, a.depth, HEADS, a.block)
    precision = "bf16" if cuda else "fp32"
    train = TrainConfig(global_batch_size=a.batch * world, micro_batch_size=a.batch, max_steps=a.steps + a.warmup,
                        precision=precision, grad_clip=1.0,
                        optimizer={"name": "adamw", "lr": 3e-4, "weight_decay": 0.01, "betas": (0.9, 0.999)})
    strategy = build_strategy(ParallelismConfig(strategy=a.strategy), world=world, rank=rank, device=device,
                              param_dtype=torch.bfloat16 if cuda else None)
    engine = Engine(model, LanguageModeling(), train, device=device, world_size=world, strategy=strategy)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, VOCAB, (a.steps + a.warmup, a.batch, a.block + 1), generator=g)
    t0 = stats = None
    for i in range(a.steps + a.warmup):
        if i == a.warmup:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        stats = engine.train_step(i, [{"x": data[i]}])
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    opt = engine.optimizer
    opt_state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {"strategy": a.strategy, "world": world, "samples_per_s": round(a.steps * a.batch * world / elapsed, 2),
           "param_bytes_rank0": bare.local_bytes(engine.module.parameters()),
           "optim_bytes_rank0": bare.local_bytes(opt_state), "final_loss": round(stats.loss_sum / stats.samples, 4)}
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def torchrun(a: argparse.Namespace, script: Path, strategy: str, extra: list[str]) -> dict:
    """One side: a `torchrun --standalone` of `--world` ranks; its JSON line (rank 0's)."""
    from common import run_side
    sizes = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--dim", str(a.dim),
             "--depth", str(a.depth), "--block", str(a.block)]
    return run_side(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.world), str(script),
                     "--strategy", strategy, *sizes, *extra], env={"OMP_NUM_THREADS": str(a.threads)})


def measure(a: argparse.Namespace) -> dict[str, list[dict]]:
    from common import alternate
    sides = {}
    for s in a.strategies:
        sides[f"bare {s}"] = lambda s=s: torchrun(a, ANCHOR, s, [])
        sides[f"openclaw {s}"] = lambda s=s: torchrun(a, Path(__file__), s, ["--side", "openclaw"])
    runs = alternate(sides, a.repeats, a.budget_s)
    for name, rs in runs.items():
        print(f"  {name}: {[r['samples_per_s'] for r in rs]} samples/s, final loss {rs[-1]['final_loss']}",
              flush=True)
    return runs


def report(a: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    """Per strategy: samples/s (openclaw over bare), and rank 0's parameter and optimizer bytes."""
    from common import summarize
    out: dict = {"world": a.world, "steps": a.steps, "batch_per_rank": a.batch,
                 "model": f"the anchor's LM, dim {a.dim} x {a.depth} blocks, {a.block} tokens", "strategies": {}}
    for s in a.strategies:
        names = (f"bare {s}", f"openclaw {s}")
        held = {name: runs[name][-1]["param_bytes_rank0"] + runs[name][-1]["optim_bytes_rank0"] for name in names}
        losses = {name: runs[name][-1]["final_loss"] for name in names}
        title = (f"{s.upper()} against a bare {s.upper()} loop, {a.world} ranks, {out['model']} (rank 0 holds "
                 f"{' / '.join(f'{held[n] / 1e6:.2f}' for n in names)} MB of parameters and optimizer state, last "
                 f"loss {' / '.join(str(losses[n]) for n in names)}, bare / openclaw)")
        speed = summarize(title, {name: [r["samples_per_s"] for r in runs[name]] for name in names},
                          base=f"bare {s}", unit="samples/s", digits=1)
        out["strategies"][s] = {"speed": speed, "held_bytes_rank0": held, "final_loss": losses}
    if {"fsdp", "ddp"} <= set(a.strategies):
        by = {who: out["strategies"]["fsdp"]["held_bytes_rank0"][f"{who} fsdp"] /
              out["strategies"]["ddp"]["held_bytes_rank0"][f"{who} ddp"] for who in ("bare", "openclaw")}
        print("FSDP / DDP bytes held on rank 0: " + "; ".join(f"{k} {v:.3f}" for k, v in by.items()))
        out["fsdp_over_ddp_bytes"] = by
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from common import add_budget
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="fsdp,ddp", help="comma-separated, of fsdp and ddp")
    p.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp", help=argparse.SUPPRESS)  # one rank side
    p.add_argument("--side", choices=("openclaw",), default=None, help=argparse.SUPPRESS)  # run by torchrun
    p.add_argument("--world", type=int, default=2, help="ranks per side (gloo on CPU, nccl on GPUs)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the clock starts")
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--block", type=int, default=128, help="tokens per sample")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (OMP_NUM_THREADS), both sides")
    add_budget(p)
    a = p.parse_args(argv)
    a.strategies = [s for s in a.strategies.split(",") if s]
    bad = [s for s in a.strategies if s not in ("fsdp", "ddp")]
    if bad or not a.strategies:
        p.error(f"--strategies: {bad or 'none given'}; choose from fsdp, ddp")
    if min(a.world, a.steps, a.batch, a.repeats, a.threads) < 1 or a.warmup < 0:
        p.error("--world, --steps, --batch, --repeats and --threads must be >= 1, --warmup >= 0")
    if not ANCHOR.exists():
        p.error(f"the anchor {ANCHOR} is missing: this bench runs it as the bare side")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.side == "openclaw":
        openclaw_side(a)
        return
    print(json.dumps(report(a, measure(a))))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py (also when torchrun runs this file)
    main()
