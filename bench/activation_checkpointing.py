#!/usr/bin/env python
"""Activation checkpointing: what `parallelism.activation_checkpointing` none / selective / full saves in
memory and costs in step time, for the built-in GPT trained through the engine, in one process.

    python bench/activation_checkpointing.py                                  # CPU: GPT dim 256 x 4, block 256
    python bench/activation_checkpointing.py --device cuda --precision bf16 --dim 1024 --depth 12 --block 1024

Every side is an `Engine` over its own copy of the same initial GPT, with the strategy
`openclaw.engine.parallel.build_strategy` builds from `ParallelismConfig(activation_checkpointing=...)`
(DDP with one process: the model is not wrapped, its blocks are marked for checkpointing), trained on
the same pre-generated batches. Per side:

- **saved for backward**: the bytes of the unique storages autograd keeps for the backward pass during
  one micro-batch's forward (`torch.autograd.graph.saved_tensors_hooks`; the parameters' own storages are
  left out). Deterministic: the same model and batch always give the same bytes. A checkpointed block
  keeps only its input; what it recomputes in the backward never reaches the hook.
- **step peak** (CUDA only): `torch.cuda.max_memory_allocated` over one optimizer step, after
  `reset_peak_memory_stats`, minus what was allocated when the step began (activations, gradients and
  temporaries; the process peak, which also holds every side's weights and optimizer state, is in the
  JSON). On CPUs the saved-for-backward bytes are the memory figure: the resident set is not measured
  per side, because it never goes down within a process.
- **step time**: `--steps` timed steps after `--warmup` untimed ones, the sides alternated (ABC CBA ...),
  median, spread and ratio to `none`.

The last line is one JSON object. No Ray: torch, pydantic and PyYAML only.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from common import add_budget, alternate, figure, summarize  # noqa: E402  (bench/ is this script's folder)

MODES = ("none", "selective", "full")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=256, help="tokens per sample")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=None, help="default: one micro-batch per step")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or this process's CPU time: steadier on a shared CPU box (CPU only)")
    p.add_argument("--seed", type=int, default=0)
    add_budget(p)
    args = p.parse_args(argv)
    args.global_batch = args.global_batch or args.micro_batch
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def saved_for_backward(engine, batch) -> dict[str, int]:
    """Bytes and count of the unique storages autograd saves for the backward during one micro-batch's
    forward through the engine (its autocast and task), the parameters' own storages left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # every saved tensor stays alive until the backward: no reuse
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = engine.fns.loss(engine.model, batch)
    del loss  # no backward: the graph and what it saved go
    return {"bytes": sum(seen.values()), "storages": len(seen)}


def step_peak(engine, micro_batches, step: int, cuda: bool) -> dict[str, int | None]:
    """One optimizer step's peak of CUDA memory: above what was allocated when it began, and the process's."""
    import torch

    if not cuda:
        engine.train_step(step, micro_batches)
        return {"step_peak_bytes": None, "process_peak_bytes": None}
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.train_step(step, micro_batches)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"step_peak_bytes": peak - start, "process_peak_bytes": peak}


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:,.1f} MiB"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.timer == "cpu" and cuda:
        sys.exit("--timer cpu only makes sense on a CPU (it does not count GPU time)")
    clock = time.perf_counter if args.timer == "wall" else time.process_time
    if not cuda:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(global_batch_size=args.global_batch, micro_batch_size=args.micro_batch, max_steps=10 ** 9,
                      precision=args.precision, schedule={"name": "constant", "warmup_steps": 0})

    # ---- one initial model, one copy per side; the same batches --------------------------------
    torch.manual_seed(args.seed)
    base = GPT(vocab_size=args.vocab, block_size=args.block, dim=args.dim, depth=args.depth, heads=args.heads)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = [[{"x": mb.to(device)} for mb in torch.randint(0, args.vocab, (args.global_batch, args.block + 1),
                                                          generator=gen).split(args.micro_batch)] for _ in range(2)]
    engines = {mode: Engine(copy.deepcopy(base), LanguageModeling(), cfg, device=device,
                            strategy=build_strategy(ParallelismConfig(activation_checkpointing=mode)))
               for mode in MODES}
    del base

    # ---- memory: saved for backward, and (CUDA) the step's peak --------------------------------
    sides: dict[str, dict[str, Any]] = {}
    for mode, engine in engines.items():
        blocks = list(engine.module.blocks.values())
        first = engine.train_step(0, data[0])  # the first step also allocates the optimizer state
        sides[mode] = {"checkpointed_blocks": sum(getattr(b, "checkpointed", False) for b in blocks), "blocks": len(blocks),
                       "first_step_loss": first.loss_sum / first.samples,
                       **{f"saved_{k}": v for k, v in saved_for_backward(engine, data[1][0]).items()},
                       **step_peak(engine, data[1], 1, cuda)}
    counters = {mode: 2 for mode in MODES}

    # ---- step time: the sides alternated ---------------------------------------------------------
    def timed(mode: str) -> float:
        engine = engines[mode]
        for _ in range(args.warmup):
            engine.train_step(counters[mode], data[counters[mode] % 2])
            counters[mode] += 1
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        for _ in range(args.steps):
            engine.train_step(counters[mode], data[counters[mode] % 2])
            counters[mode] += 1
        if cuda:
            torch.cuda.synchronize()
        return 1e3 * (clock() - t0) / args.steps

    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'threads {torch.get_num_threads()}'}), "
          f"torch {torch.__version__}, precision {engines['none'].precision.name}, timer {args.timer}")
    print(f"GPT dim {args.dim} depth {args.depth} heads {args.heads} block {args.block} vocab {args.vocab} "
          f"({n_params / 1e6:.2f}M params), global batch {args.global_batch} = micro {args.micro_batch} x "
          f"{args.global_batch // args.micro_batch}, {args.steps} steps (+{args.warmup} warmup) x {args.repeats} repeats")
    times = alternate({mode: (lambda mode=mode: timed(mode)) for mode in MODES}, args.repeats, args.budget_s)
    step_time = summarize(f"step time, activation checkpointing none / selective / full, GPT {n_params / 1e6:.1f}M, "
                          f"{device.type}", times, base="none", unit="ms", digits=1)

    # ---- the table -------------------------------------------------------------------------------
    none = sides["none"]
    print(f"{'mode':<10} {'ckpt blocks':>11} {'saved for backward':>20} {'vs none':>8} {'step peak (CUDA)':>17} "
          f"{'vs none':>8} {'step ms':>9} {'vs none':>8}")
    for mode, s in sides.items():
        s["saved_ratio"] = round(s["saved_bytes"] / none["saved_bytes"], 3)
        s["step_peak_ratio"] = (round(s["step_peak_bytes"] / none["step_peak_bytes"], 3)
                                if s["step_peak_bytes"] is not None else None)
        s["step_ms"] = step_time["sides"][mode]
        print(f"{mode:<10} {s['checkpointed_blocks']:>5}/{s['blocks']:<5} {mib(s['saved_bytes']):>20} "
              f"{s['saved_ratio']:>8.3f} {mib(s['step_peak_bytes']):>17} {_ratio(s['step_peak_ratio']):>8} "
              f"{s['step_ms']['median']:>9.1f} {s['step_ms']['ratio']:>8.3f}")
    losses = [s["first_step_loss"] for s in sides.values()]
    print(f"first-step loss, every side: {losses[0]:.6f} (max |diff| {max(losses) - min(losses):.2e}: the same math)")
    if not cuda:
        print("memory on CPU: the saved-for-backward bytes; the resident set is not measured per side (it never "
              "goes down within a process)")
    saved = figure(f"bytes saved for the backward in one micro-batch's forward, activation checkpointing none / "
                   f"selective / full, GPT {n_params / 1e6:.1f}M, {device.type} (deterministic: one count per side)",
                   {mode: [s["saved_bytes"] / 2 ** 20] for mode, s in sides.items()}, base="none", unit="MiB", digits=1)
    print(json.dumps({"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                      "precision": engines["none"].precision.name, "params": n_params,
                      "model": {k: getattr(args, k) for k in ("dim", "depth", "heads", "block", "vocab")},
                      "micro_batch": args.micro_batch, "global_batch": args.global_batch, "timer": args.timer,
                      "threads": None if cuda else torch.get_num_threads(), "sides": sides, "step_time": step_time,
                      "saved": saved}))


if __name__ == "__main__":
    main()
